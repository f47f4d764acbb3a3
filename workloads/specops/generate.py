"""The data generation driver: sources -> chat/loss mask -> slice -> resume -> engine -> sink.

One call handles one input slice (`run.shard_index` of `run.num_shards`, what a Kubernetes
Indexed-Job pod gets) or, with `run.num_workers > 1`, spawns that many local worker processes that
split the slice further: worker `w` of slice `k` of `K` takes slice `k*W + w` of `K*W`. Slices are
chosen by a stable hash of the example id, so they are disjoint and complete whatever the order
the sources yield rows in, and a rerun skips every id the sink already committed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specops import exitcodes
from specops.config import ConfigError, DataGenConfig, load_config
from specops.generate_report import GenerateReport

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from specops.data.records import Conversation, TokenizedExample
    from specops.engines.base import InferencePipeline
    from specops.example import ExampleDict
    from specops.generate_progress import GenerationProgress
    from specops.stores.base import DataSink, StoreMeta

log = logging.getLogger(__name__)

WINDOW_BATCHES = 16
"""Examples are read `WINDOW_BATCHES * batch_size` at a time and grouped by length inside the window."""


class GenerateError(RuntimeError):
    """Some examples or workers failed; `report` holds what was done and what failed."""

    def __init__(self, report: GenerateReport) -> None:
        problems = [*report.worker_errors]
        if report.failed:
            shown = ", ".join(report.failed_ids[:5]) + (" ..." if report.failed > 5 else "")
            problems.append(f"{report.failed} example(s) failed: {shown}")
        super().__init__("; ".join(problems))
        self.report = report


def resolve_config(config: DataGenConfig | str | Path, overrides: dict[str, Any]) -> DataGenConfig:
    """A validated config with dotted overrides applied (`engine__batch_size` means `engine.batch_size`)."""
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    if isinstance(config, DataGenConfig):
        return load_config(DataGenConfig, config.model_dump(mode="json"), dotted)
    return load_config(DataGenConfig, config, dotted)


def in_slice(example_id: str, index: int, count: int) -> bool:
    """Whether `example_id` belongs to slice `index` of `count`: no coordination needed.

    Slices are equal ranges of a 64-bit hash, so they nest: slice `k*W + w` of `K*W` lies inside
    slice `k` of `K`, and pods running different worker counts still partition the same ids.
    """
    digest = hashlib.sha256(example_id.encode()).digest()
    return (int.from_bytes(digest[:8], "big") * count) >> 64 == index


def worker_config(config: DataGenConfig, worker: int) -> DataGenConfig:
    """Local worker `worker`'s own single-process slice of this process's slice."""
    run, metrics = config.run, config.metrics
    update = {
        "num_workers": 1,
        "shard_index": run.shard_index * run.num_workers + worker,
        "num_shards": run.num_shards * run.num_workers,
    }
    port = metrics.port_of(worker)  # worker w serves port + w, as ranks do
    return config.model_copy(
        update={"run": run.model_copy(update=update), "metrics": metrics.model_copy(update={"port": port})}
    )


def generate_data(config: DataGenConfig | str | Path, **overrides: Any) -> GenerateReport:
    """Run data generation for this process's slice; raises GenerateError if anything failed.

    With `run.num_workers > 1` the workers are spawned processes: call this under
    `if __name__ == "__main__":` in scripts.
    """
    cfg = resolve_config(config, overrides)
    report = run_workers(cfg) if cfg.run.num_workers > 1 else run_slice(cfg)
    if not report.ok:
        raise GenerateError(report)
    return report


# ---------------------------------------------------------------------------- one slice


def run_slice(config: DataGenConfig) -> GenerateReport:
    """Generate this process's slice in-process and finalize the sink when nothing failed."""
    from specops.generate_progress import GenerationProgress
    from specops.stores.factory import FinalizingSink, open_sink
    from specops.stores.streaming import MetricsServer
    from specops.verifier import load_tokenizer

    started = time.monotonic()
    report = GenerateReport()
    tokenizer = load_tokenizer(config.verifier, config.run.allowed_roots)
    meta = store_meta(config, tokenizer)
    sink = open_sink(config, meta)
    progress = GenerationProgress(report, config.run.shard_index, config.run.num_shards, sink)
    server = None
    try:
        if config.metrics.port is not None:
            server = MetricsServer(config.metrics.port, progress, config.metrics.host)
            log.info(
                "%s: progress metrics on %s:%d/metrics", progress.label, config.metrics.host, server.port
            )
        if config.sync.claim_ranges:
            generate_claimed(sink, config, meta, tokenizer, progress)
        else:
            done = sink.done_ids()
            progress.expect(count_slice(config, done))
            examples = tokenized_slice(config, tokenizer, done, report, progress)
            generate_if_any(None, sink, examples, config, meta, progress)
    except BaseException:
        sink.close()
        raise
    finally:
        if server is not None:
            server.close()
    if report.ok and isinstance(sink, FinalizingSink):
        sink.finalize()
    else:
        sink.close()
    report.seconds = time.monotonic() - started
    log.info("slice %d/%d: %s", config.run.shard_index, config.run.num_shards, json.dumps(report.to_json()))
    return report


def generate_claimed(
    sink: DataSink,
    config: DataGenConfig,
    meta: StoreMeta,
    tokenizer: PreTrainedTokenizerBase,
    progress: GenerationProgress,
) -> None:
    """Online with `sync.claim_ranges`: generate ranges claimed from the broker until none is left.

    A generator that dies releases its unfinished range to the next claimer, which skips the ids
    the stream already delivered and regenerates the rest (the broker drops duplicates). A range
    is reported complete only when all of it went through; after a failure the loop stops. The
    engine loads at the first range with work left, so a generator that comes late loads nothing.
    """
    from specops.stores.zmq import ZmqStore

    if not isinstance(sink, ZmqStore) or config.sync.claim_ranges is None:
        raise ConfigError("sync.claim_ranges: ranges are claimed from a broker (sync.kind 'zmq')")
    engine: InferencePipeline | None = None
    report = progress.report
    while report.ok and (claim := sink.claim(config.sync.claim_ranges)) is not None:
        run = config.run.model_copy(update={"shard_index": claim.index, "num_shards": claim.count})
        part = config.model_copy(update={"run": run})
        done = sink.range_done_ids(claim)
        progress.expect(count_slice(part, done))
        examples = tokenized_slice(part, tokenizer, done, report, progress)
        engine = generate_if_any(engine, sink, examples, part, meta, progress)
        if report.ok:
            sink.complete(claim)


def generate_if_any(
    engine: InferencePipeline | None,
    sink: DataSink,
    examples: Iterator[TokenizedExample],
    config: DataGenConfig,
    meta: StoreMeta,
    progress: GenerationProgress,
) -> InferencePipeline | None:
    """Generate `examples`, loading the engine (seconds to minutes) only when there is one to
    generate and `engine` is None; returns the engine for the next call."""
    first = next(examples, None)
    if first is None:
        return engine
    if engine is None:
        engine = load_engine(config, meta)
    generate_examples(engine, sink, itertools.chain([first], examples), config, progress)
    return engine


def load_engine(config: DataGenConfig, meta: StoreMeta | None = None) -> InferencePipeline:
    """The engine `engine.kind` names; with `meta`, checked to produce what the sink records."""
    engine: InferencePipeline
    if config.engine.kind == "transformers":
        from specops.engines.transformers import TransformersPipeline

        engine = TransformersPipeline.from_config(config)
    else:
        try:
            from specops.engines.vllm import VllmPipeline
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"engine.kind: {config.engine.kind!r} is not available ({exc.name} is missing)"
            ) from None
        engine = VllmPipeline.from_config(config)
    if meta is not None:
        produced = (tuple(engine.layer_ids), engine.num_layers, engine.hidden_size)
        if produced != (meta.layer_ids, meta.num_layers, meta.hidden_size):
            raise RuntimeError(
                f"engine {config.engine.kind!r} produces (layer ids, layers, hidden size) {produced}, "
                f"the verifier config says {(meta.layer_ids, meta.num_layers, meta.hidden_size)}"
            )
    return engine


def store_meta(config: DataGenConfig, tokenizer: PreTrainedTokenizerBase) -> StoreMeta:
    """The producer identity the sink records and checks before mixing examples.

    Read from the verifier's config alone (no weights), so a rerun with nothing left to generate
    never loads the model.
    """
    from specops.data.chat import template_sha256
    from specops.engines.base import resolve_layer_ids
    from specops.engines.transformers import compute_dtype_name
    from specops.stores.base import StoreMeta
    from specops.verifier import load_verifier_config, resolve_device, resolve_dtype, verifier_identity

    dtype = resolve_dtype(compute_dtype_name(config), resolve_device(config.engine.device))
    text = load_verifier_config(config.verifier, config.run.allowed_roots).get_text_config()
    num_layers = int(text.num_hidden_layers)
    return StoreMeta(
        verifier=verifier_identity(config.verifier),
        layer_ids=tuple(resolve_layer_ids(config.states.hidden_states.layers, num_layers)),
        num_layers=num_layers,
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        dtype=str(dtype).removeprefix("torch."),
        chat_template_sha256=template_sha256(config.chat_template or tokenizer.chat_template),
    )


def tokenized_slice(
    config: DataGenConfig,
    tokenizer: PreTrainedTokenizerBase,
    done: set[str],
    report: GenerateReport,
    progress: GenerationProgress | None = None,
) -> Iterator[TokenizedExample]:
    """This slice's examples not yet in the sink, tokenized with their loss masks.

    Sequences are cut to `min(processor.max_length, engine.max_seq_len)`. A conversation the chat
    template cannot render (or that keeps too few trainable tokens) is counted as dropped. With
    `regenerate`, the answering stage's progress is served through `progress` (if given).
    """
    from specops.data.chat import ChatTemplateError, tokenize_conversation

    processor = config.processor.model_copy(update={"max_length": config.sequence_limit})
    conversations = slice_conversations(config, done, report)
    if config.regenerate is not None:
        from specops.generate_progress import AnswerProgress
        from specops.regenerate import regenerated_slice

        answers = AnswerProgress(report, config.run.shard_index, config.run.num_shards)
        if progress is not None:
            progress.answers = answers
        conversations = regenerated_slice(
            config, tokenizer, conversations, answers, lambda answered: count_slice(config, done | answered)
        )
    for conversation in conversations:
        try:
            example = tokenize_conversation(tokenizer, conversation, processor, config.chat_template)
        except ChatTemplateError as exc:
            log.warning("%s: dropped: %s", conversation.id, exc)
            example = None
        if example is None:
            report.dropped += 1
            continue
        yield example


def count_slice(config: DataGenConfig, done: set[str]) -> int:
    """Conversations of this slice not yet stored: the progress total, from one pass over the
    sources (no tokenizing, no model)."""
    return sum(1 for _ in slice_conversations(config, done, GenerateReport()))


def slice_conversations(
    config: DataGenConfig, done: set[str], report: GenerateReport
) -> Iterator[Conversation]:
    """This slice's conversations the sink does not hold yet, in source order."""
    from specops.data.sources import iter_conversations

    run = config.run
    for position, source in enumerate(config.datasets):
        for conversation in iter_conversations(source, position, run.allowed_roots):
            if not in_slice(conversation.id, run.shard_index, run.num_shards):
                continue
            if conversation.id in done:
                report.skipped += 1
                continue
            yield conversation


def generate_examples(
    engine: InferencePipeline,
    sink: DataSink,
    examples: Iterable[TokenizedExample],
    config: DataGenConfig,
    progress: GenerationProgress,
) -> None:
    """Length-grouped batches through the engine into the sink, with a progress bar on stderr
    (total and ETA: the slice's examples; dropped and failed ones count as processed) and a
    progress line in the log every `generate_progress.LOG_EVERY_S`."""
    from specops.engines.batching import plan_batches, windows

    engine_cfg, report = config.engine, progress.report
    progress.start()
    with progress.bar() as bar:
        for window in windows(examples, WINDOW_BATCHES * engine_cfg.batch_size):
            lengths = [len(e.token_ids) for e in window]
            for _, indices in plan_batches(lengths, engine_cfg.batch_size, engine_cfg.max_tokens_per_batch):
                batch = [window[i] for i in indices]
                for output in _forward_or_isolate(engine, batch, report):
                    sink.write(output)
                    report.written += len(output)
                    report.tokens += sum(len(e["token_ids"]) for e in output)
                progress.show(bar)
        bar.update(progress.processed - bar.n)
    progress.maybe_log(force=True)


def _forward_or_isolate(
    engine: InferencePipeline, batch: list[TokenizedExample], report: GenerateReport
) -> Iterator[list[ExampleDict]]:
    """Forward a batch; when it runs out of accelerator memory, retry its examples one by one and
    report those that fail alone (a rerun retries them)."""
    import torch

    try:
        yield engine.forward(batch)
        return
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            log.error("%s: out of memory even alone", batch[0].id)
            report.failed += 1
            report.failed_ids.append(batch[0].id)
            return
        log.warning("out of memory on a batch of %d; retrying one by one", len(batch))
    for example in batch:
        yield from _forward_or_isolate(engine, [example], report)


# ---------------------------------------------------------------------------- local workers


def run_workers(config: DataGenConfig) -> GenerateReport:
    """Spawn `run.num_workers` processes, wait for all, and merge their reports.

    The verifier is resolved and its architecture checked here first: a bad path or an unsupported
    verifier fails once, before any worker starts, and a GGUF verifier is converted once instead of
    by every worker at the same time.
    """
    from specops.verifier import load_verifier_config

    load_verifier_config(config.verifier, config.run.allowed_roots)
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    report = GenerateReport()
    with tempfile.TemporaryDirectory(prefix="specops-workers-") as tmp:
        workers = []
        for w in range(config.run.num_workers):
            sub = worker_config(config, w)
            out = Path(tmp) / f"report-{w}.json"
            proc = ctx.Process(
                target=worker_main,
                args=(sub.model_dump_json(), w, config.run.num_workers, str(out)),
                name=f"specops-generate-{sub.run.shard_index}",
            )
            proc.start()
            log.info("worker %d (slice %d/%d): pid %s", w, sub.run.shard_index, sub.run.num_shards, proc.pid)
            workers.append((proc, sub, out))
        for proc, sub, out in workers:
            proc.join()
            where = f"worker pid {proc.pid} (slice {sub.run.shard_index}/{sub.run.num_shards})"
            if out.is_file():
                report.add(GenerateReport.from_json(json.loads(out.read_text())))
            if proc.exitcode != 0:
                code = proc.exitcode or 0
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                report.worker_errors.append(f"{where} {how}")
    report.seconds = time.monotonic() - started
    return report


def worker_main(config_json: str, worker: int, num_workers: int, report_path: str) -> None:
    """Entry point of a spawned worker: share the CPU (or pick a GPU), run the slice, write the report."""
    import torch

    config = DataGenConfig.model_validate_json(config_json)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_workers))
    device = config.engine.device
    gpus = torch.cuda.device_count()
    if device in ("auto", "cuda") and gpus > 1:
        engine = config.engine.model_copy(update={"device": f"cuda:{worker % gpus}"})
        config = config.model_copy(update={"engine": engine})
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {worker} %(levelname)s %(message)s")
    try:
        report = run_slice(config)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # Bad input (config, paths, unreadable sources, another producer's store): one line, no traceback.
        print(f"specops generate-data worker {worker}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if not exitcodes.out_of_space(exc):
            raise
        # A full disk: one line too, exit 1 (the rerun resumes once space is freed).
        print(f"specops generate-data worker {worker}: error: {exc}", file=sys.stderr)
        sys.exit(exitcodes.FAILED)
    Path(report_path).write_text(json.dumps(report.to_json()))
    sys.exit(0 if report.ok else 1)
