"""`specops plan FILE [--estimate] [--json]`: what a run will store and cost, before any GPU starts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specops import exitcodes
from specops.commands import add_allowed_root


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        type=Path,
        help="a DataGenConfig or TrainConfig YAML, or SpeculatorDataGen/SpeculatorTraining YAML (kubectl's)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="do not tokenize local sources; estimate tokens from the example count instead",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per run instead of a table"
    )
    add_allowed_root(parser)
    parser.epilog = (
        "For each data generation the file asks for: examples and tokens (counted by tokenizing local "
        "sources as generation does, or estimated from maxSamples, a split slice or known dataset sizes), "
        "bytes of hidden states per token and in total (layers captured, hidden size, dtype), shard "
        "files, the broker's peak memory for online runs, and a generation time where the project "
        "measured the throughput of that verifier, engine and device (the source is printed). "
        "For each training: the examples and tokens it reads (a DiskStore's manifests, the plan of the "
        "generation feeding it, or a stream's maxSteps x tokensPerStep), the held-out share, optimizer "
        "steps, the draft's parameters (built on the meta device from a local or cached config.json; "
        "nothing is downloaded) and its checkpoints' bytes on disk."
    )


def main(args: argparse.Namespace) -> int:
    from specops.plan_inputs import planned
    from specops.plan_train import plan_training

    found = planned(args.file, args.allowed_root)
    runs: dict[str, dict[str, Any]] = {}
    for run in found.runs:
        result = runs[run.label] = plan_run(run, count_tokens=not args.estimate)
        print(json.dumps(result) if args.json else render(result))
    for training in found.trainings:
        result = plan_training(training, runs.get(training.feed) if training.feed else None)
        print(json.dumps(result) if args.json else render_training(result))
    return exitcodes.OK


def plan_run(run: Any, count_tokens: bool = True) -> dict[str, Any]:
    """The plan of one run as plain data (what `--json` prints)."""
    from specops import plan
    from specops.engines.base import default_layer_ids
    from specops.plan_inputs import count, countable, even_split, verifier_shape

    config = run.config
    out: dict[str, Any] = {"run": run.label, "verifier": config.verifier.name_or_path}
    shape = verifier_shape(run)
    if isinstance(shape, str):
        out["unknown"] = f"verifier shape: {shape}"
        return out
    dtype = plan.stored_dtype(config.engine.dtype, config.verifier.dtype, run.gpu)
    layers = config.states.hidden_states.layers or default_layer_ids(shape.num_layers)
    out["shape"] = {
        "layers": shape.num_layers,
        "hidden": shape.hidden_size,
        "vocab": shape.vocab_size,
        "source": shape.source,
    }
    out["capture"] = {"layers": list(layers), "slots": plan.capture_slots(config.states, shape.num_layers)}
    out["dtype"] = dtype
    why_not = countable(config) if count_tokens else "--estimate"
    if why_not is None:
        counted = count(config, run.writers)
        estimate = plan.storage(counted.examples, counted.tokens, config.states, shape, dtype, counted=True)
        per_writer, longest = counted.per_writer, counted.longest
        out["dropped"] = counted.dropped
        out["tokens_source"] = "counted: the sources tokenized as generation does" + (
            " (with the datasets' answers; regenerate replaces them)" if config.regenerate else ""
        )
    else:
        found = plan.estimate_storage(config.datasets, config.sequence_limit, config.states, shape, dtype)
        if found is None:
            out["bytes_per_token"] = plan.bytes_per_token(config.states, shape, dtype)
            out["unknown"] = (
                f"examples: a dataset's size is unknown ({why_not}); set datasets[].maxSamples or a split "
                "slice such as train[:10000]"
            )
            return out
        estimate = found
        per_writer, longest = even_split(estimate.examples, run.writers), config.sequence_limit
        out["tokens_source"] = (
            f"estimated: {min(plan.MEAN_TOKENS_PER_EXAMPLE, config.sequence_limit)} per example; {why_not}"
        )
    out.update(
        examples=estimate.examples,
        tokens=estimate.tokens,
        bytes_per_token=estimate.bytes_per_token,
        total_bytes=estimate.total_bytes,
        arithmetic=estimate.describe(),
    )
    if run.online:
        from specops.stores.zmq import DEFAULT_CREDITS

        memory = plan.broker_memory(
            run.trainer_ranks,
            DEFAULT_CREDITS,
            run.writers,
            longest * estimate.bytes_per_token,
            config.sync.max_broker_bytes,
        )
        out["broker"] = {
            "in_flight_bytes": memory.in_flight_bytes,
            "budget_bytes": memory.budget_bytes,
            "peak_bytes": memory.peak_bytes,
            "limit_bytes": run.broker_limit_bytes,
        }
    else:
        out["shards"] = plan.shard_count(per_writer, config.sync.shard_size)
        out["shard_size"] = config.sync.shard_size
        out["writers"] = run.writers
        out["storage_bytes"] = run.storage_bytes
    device = "cuda" if run.gpu else "cpu"
    measured = plan.generation_throughput(shape, config.engine.kind, device)
    if measured is not None:
        out["time"] = {
            "seconds": estimate.tokens / measured.tokens_per_s,
            "tokens_per_s": measured.tokens_per_s,
            "source": measured.source,
        }
    else:
        out["time"] = None
    return out


def _rows(title: str) -> tuple[list[str], Callable[[str, str], None]]:
    lines = [title]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<15} {text}")

    return lines, row


def _storage(row: Callable[[str, str], None], requested: int | None, needed: int) -> None:
    """The claim's size against what the run needs, where the spec sets one."""
    from specops.plan import human

    if requested is not None:
        row("storage", f"{human(requested)} requested: {'fits' if requested >= needed else 'TOO SMALL'}")


def render(result: dict[str, Any]) -> str:
    """The plan as aligned lines for a terminal."""
    from specops.plan import human

    lines, row = _rows(result["run"])

    row("verifier", result["verifier"])
    if "shape" in result:
        shape = result["shape"]
        row(
            "shape",
            f"{shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']} ({shape['source']})",
        )
        row("capture", f"layers {result['capture']['layers']} in {result['dtype']}")
    if "examples" in result:
        row(
            "examples",
            f"{result['examples']:,}" + (f" ({result['dropped']} dropped)" if result.get("dropped") else ""),
        )
        row("tokens", f"{result['tokens']:,} ({result['tokens_source']})")
        row("per token", f"{result['bytes_per_token']:,} B")
        row("hidden states", f"{human(result['total_bytes'])}: {result['arithmetic']}")
    if "shards" in result:
        row(
            "shards",
            f"{result['shards']} shard file(s) of up to {result['shard_size']} examples, "
            f"from {result['writers']} writer(s)",
        )
        _storage(row, result["storage_bytes"], result["total_bytes"])
    if "broker" in result:
        broker = result["broker"]
        row(
            "broker",
            f"peak {human(broker['peak_bytes'])} (budget {human(broker['budget_bytes'])} + its own ~70 MiB); "
            f"in flight to keep every rank fed: {human(broker['in_flight_bytes'])}",
        )
        if broker["limit_bytes"] is not None and broker["limit_bytes"] < broker["peak_bytes"]:
            row("", f"the broker's memory limit {human(broker['limit_bytes'])} is below that peak")
    if "unknown" in result:
        row("unknown", result["unknown"])
    elif result.get("time"):
        time = result["time"]
        row(
            "time",
            f"~{time['seconds']:.0f} s generating at {time['tokens_per_s']} tokens/s ({time['source']})",
        )
    elif "time" in result:
        row("time", "no measured throughput for this verifier, engine and device: not estimated")
    return "\n".join(lines)


def render_training(result: dict[str, Any]) -> str:
    """A training's plan as aligned lines for a terminal."""
    from specops.plan import human

    lines, row = _rows(result["training"])
    row("verifier", result["verifier"])
    data = result["data"]

    def amount(examples: int | None, tokens: int | None) -> str:
        parts = [f"{examples:,} examples"] if examples is not None else []
        return ", ".join(parts + ([f"{tokens:,} tokens"] if tokens is not None else []))

    row("data", f"{amount(data['examples'], data['tokens']) or 'unknown'} ({data['kind']}; {data['source']})")
    if "held_out" in result:
        held = result["held_out"]
        row("held out", f"{amount(held['examples'], held['tokens'])} ({held['source']})")
        row("trained on", amount(result["train"]["examples"], result["train"]["tokens"]))
    steps = result["steps"]
    count = "unknown" if steps["count"] is None else f"{steps['count']:,}"
    row("steps", f"{count} on {result['ranks']} rank(s) ({steps['source']})")
    draft = result["draft"]
    if "unknown" in draft:
        row("draft", f"parameters unknown: {draft['unknown']}")
    else:
        row(
            "draft",
            f"{draft['parameters']:,} parameters, {draft['trainable']:,} trainable ({draft['source']})",
        )
    if "checkpoint" in result:
        ckpt = result["checkpoint"]
        row(
            "checkpoint",
            f"{human(ckpt['bytes'])} each (model {human(ckpt['model_bytes'])} + AdamW state "
            f"{human(ckpt['optimizer_bytes'])} + RNG and JSON)",
        )
        row(
            "disk",
            f"{human(ckpt['peak_bytes'])} at most: keepCheckpoints {ckpt['keep']} + the one being written "
            f"+ {ckpt['published']} model-only dir(s) (final{', best' if ckpt['published'] > 1 else ''})",
        )
        _storage(row, result["storage_bytes"], ckpt["peak_bytes"])
    row("time", "the project has measured no training throughput: not estimated")
    return "\n".join(lines)
