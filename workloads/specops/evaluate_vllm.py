"""`specops evaluate --engine vllm`: serve the speculator with vLLM itself and read vLLM's counters.

Our own evaluator (`specops.evaluate`) decodes with the verifier and the draft in PyTorch; this one
hands the saved speculator directory to `vllm.LLM(speculative_config={"method": "eagle3", ...})`,
generates greedily from the same prompts, and reports what vLLM counted
(`vllm:spec_decode_num_drafts`, `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`) as
acceptance length `1 + accepted / drafts` and per-position acceptance, beside our evaluator's
figures. It proves that vLLM loads the checkpoint format and drafts with it as we do.

vLLM spawns processes: call `main` only from a `__main__` entry point (the `specops` CLI is one).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from specops import exitcodes

DRAFTS = "vllm:spec_decode_num_drafts"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


VLLM_DTYPES: dict[str, Literal["float32", "bfloat16", "float16"]] = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
}
"""Verifier dtypes vLLM serves, by torch name."""


@dataclass
class ServedAcceptance:
    """vLLM's own counters over one generate call, turned into acceptance figures."""

    prompts: int
    speculative_tokens: int
    drafts: int
    accepted_tokens: int
    acceptance_length: float
    per_position: list[float]
    generated_tokens: int
    outputs_equal_greedy: int
    """Prompts whose vLLM output equals the verifier's greedy decoding by Transformers."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def counter_totals(metrics: Iterable[Any], k: int) -> tuple[int, int, list[int]]:
    """(drafts, accepted tokens, accepted per position) summed over engines from `llm.get_metrics()`."""
    drafts = accepted = 0
    per_position = [0] * k
    for metric in metrics:
        if metric.name == DRAFTS:
            drafts += int(metric.value)
        elif metric.name == ACCEPTED:
            accepted += int(metric.value)
        elif metric.name == PER_POSITION:
            for j, value in enumerate(list(metric.values)[:k]):
                per_position[j] += int(value)
    return drafts, accepted, per_position


def acceptance(
    before: tuple[int, int, list[int]],
    after: tuple[int, int, list[int]],
    *,
    prompts: int,
    k: int,
    generated: int,
    outputs_equal_greedy: int,
    seconds: float,
) -> ServedAcceptance:
    """Figures from two counter snapshots (vLLM's counters are process-wide and only grow)."""
    drafts = after[0] - before[0]
    accepted = after[1] - before[1]
    per_position = [a - b for a, b in zip(after[2], before[2], strict=True)]
    return ServedAcceptance(
        prompts=prompts,
        speculative_tokens=k,
        drafts=drafts,
        accepted_tokens=accepted,
        acceptance_length=1.0 + accepted / drafts if drafts else 1.0,
        per_position=[c / drafts if drafts else 0.0 for c in per_position],
        generated_tokens=generated,
        outputs_equal_greedy=outputs_equal_greedy,
        seconds=round(seconds, 3),
    )


def serve(
    verifier_dir: str,
    speculator_dir: Path,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    dtype_name: str,
    eos: set[int],
) -> ServedAcceptance:
    """Generate greedily with vLLM serving the speculator and read its counters."""
    import torch
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from specops.engines.vllm import kv_bytes_per_token, memory_kwargs

    max_len = max(len(p) for p in prompts) + max_new_tokens + k + 1
    cpu_kv = None
    if current_platform.is_cpu():
        text = AutoConfig.from_pretrained(verifier_dir).get_text_config()
        per_token = kv_bytes_per_token(text, getattr(torch, dtype_name), extra_layers=1)
        cpu_kv = per_token * max_len * len(prompts)
    llm = LLM(
        model=verifier_dir,
        dtype=VLLM_DTYPES[dtype_name],
        max_model_len=max_len,
        max_num_seqs=max(1, len(prompts)),
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        disable_log_stats=False,
        speculative_config={"model": str(speculator_dir), "method": "eagle3", "num_speculative_tokens": k},
        **memory_kwargs(cpu_kv, 0.85),
    )
    try:
        params = SamplingParams(
            max_tokens=max_new_tokens, temperature=0.0, detokenize=False, stop_token_ids=sorted(eos)
        )
        before = counter_totals(llm.get_metrics(), k)
        began = time.perf_counter()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        seconds = time.perf_counter() - began
        after = counter_totals(llm.get_metrics(), k)
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return acceptance(
        before,
        after,
        prompts=len(prompts),
        k=k,
        generated=sum(len(t) for t in tokens),
        outputs_equal_greedy=sum(t == list(r) for t, r in zip(tokens, references, strict=True)),
        seconds=seconds,
    )


def main(args: argparse.Namespace) -> int:
    """The `--engine vllm` branch of `specops evaluate` (arguments already range-checked)."""
    from specops.engines.vllm import require_vllm
    from specops.eval_inputs import load_inputs
    from specops.evaluate import eos_ids, evaluate, greedy_references
    from specops.models.config import SpeculatorFormatError
    from specops.models.families import unservable_draft
    from specops.stores.atomic import write_json_atomic
    from specops.verifier import resolve_verifier

    try:
        require_vllm("--engine")
        inputs = load_inputs(args)
        model, draft, prompts = inputs.model, inputs.draft, inputs.prompts
        types = getattr(draft.config.layer_config, "layer_types", None) or ()
        unservable = unservable_draft(model.config, len(draft.layers), types)
        if unservable:
            raise ValueError(f"--engine vllm: {unservable}")
        verifier, speculator_dir, device, dtype = (
            inputs.verifier,
            inputs.speculator_dir,
            inputs.device,
            inputs.dtype,
        )
        k = args.k or draft.config.spec.speculative_tokens
        references = greedy_references(model, prompts, args.max_new_tokens)
        ours = evaluate(
            model,
            draft,
            prompts,
            max_new_tokens=args.max_new_tokens,
            k=k,
            check_lossless=not args.no_lossless_check,
            references=references,
            max_mismatch_rate=args.max_mismatch_rate,
        )
        ours.source = inputs.source
        eos = eos_ids(model)
        del model, draft, inputs  # vLLM needs the memory
        gc.collect()
        served = serve(
            resolve_verifier(verifier, args.allowed_root),
            speculator_dir,
            prompts,
            references,
            k=k,
            max_new_tokens=args.max_new_tokens,
            dtype_name=str(dtype).removeprefix("torch."),
            eos=eos,
        )
    except (SpeculatorFormatError, ValueError, KeyError, FileNotFoundError) as exc:
        return exitcodes.fail("evaluate", exc, default=exitcodes.CONFIG)
    report = {"engine": "vllm", "device": str(device), "vllm": served.to_dict(), "specops": ours.to_dict()}
    print(json.dumps(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output, report)
    if not ours.passed:
        print(f"specops evaluate: error: {ours.mismatch_message()}", file=sys.stderr)
        return exitcodes.NOT_BETTER
    return exitcodes.OK
