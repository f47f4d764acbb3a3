"""How to serve a trained speculator with vLLM: the exact commands SpecOps prints and records.

Pure string building (no torch, no vLLM) so the operator's artifact record and `specops run`'s
report say the same thing.
"""

from __future__ import annotations

import json
import shlex


def speculative_config(
    speculator_dir: str, speculative_tokens: int, method: str = "eagle3"
) -> dict[str, object]:
    """vLLM's `--speculative-config` for a speculators-format EAGLE-3 (or HASS) draft."""
    return {"model": speculator_dir, "method": method, "num_speculative_tokens": speculative_tokens}


def vllm_serve_command(verifier: str, speculator_dir: str, speculative_tokens: int) -> str:
    """`vllm serve <verifier> --speculative-config '{...}'`, quoted for a POSIX shell."""
    config = json.dumps(speculative_config(speculator_dir, speculative_tokens), separators=(",", ":"))
    return f"vllm serve {shlex.quote(verifier)} --speculative-config {shlex.quote(config)}"


def vllm_serve_short(speculator_dir: str) -> str:
    """`vllm serve <speculator_dir>`: vLLM reads the verifier and k from the speculators config."""
    return f"vllm serve {shlex.quote(speculator_dir)}"
