"""The training loop: examples -> packed batches -> TTT forward -> KL (or HASS) loss -> AdamW.

Read it top to bottom: `train()` joins the torchrun world and installs the SIGTERM handler;
`Trainer.__init__` composes data, verifier head, draft, wrapper, optimizer and (when resuming)
restores every piece of state; `Trainer.run` is the loop. Ranks move in lockstep: before each
step one all-reduce tells every rank whether all of them have a batch, whether any was asked to
stop, and how many target tokens each TTT step has over the whole world (the loss denominators).
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from specops.config import ConfigError, DraftConfig, TrainConfig, dump_config
from specops.engines.base import default_layer_ids
from specops.models.batch import DraftBatch
from specops.models.eagle3 import Eagle3DraftModel
from specops.models.families import unservable_draft
from specops.models.ttt import step_targets
from specops.models.verifier_head import VerifierHead
from specops.models.vocab import build_vocab_mapping
from specops.paths import resolve_allowed
from specops.serving import vllm_serve_command
from specops.stores.base import DataSource, StoreMeta, StreamSource
from specops.stores.streaming import MetricsServer
from specops.train.checkpoint import (
    Checkpointer,
    NonFiniteError,
    latest_checkpoint,
    remove_partial,
    resume_checkpoint,
)
from specops.train.data import Prefetcher, StreamFactory, TrainData, open_source, stream_cache, vocab_counts
from specops.train.distributed import DistEnv, all_reduce, barrier, init_distributed, shutdown, wrap
from specops.train.init_from import start_from
from specops.train.losses import METRICS, LossSpec, draft_loss, step_valid_counts, summarize
from specops.train.monitor import LogHook, Monitor
from specops.train.optim import build_optimizer, lr_at, set_lr, trainable_parameters
from specops.train.packing import PackedBatch, batches, count_batches
from specops.train.progress import Progress
from specops.train.tracking import Trackers, check_installed
from specops.verifier import load_verifier_config, resolve_verifier, verifier_reference

log = logging.getLogger(__name__)

Source = DataSource | StreamSource | StreamFactory
MAX_NONFINITE_STEPS = 3
"""Steps in a row with an inf/NaN gradient norm (from the loss or the weights) that are skipped
before the run stops with NonFiniteError: one bad batch is survivable, a diverged run is not."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or interrupted) run produced."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    """The newest step checkpoint (model + state/)."""
    final: Path | None
    """Model-only directory of the last step (None when interrupted)."""
    best: Path | None
    """Model-only directory of the best validation loss (None without validation)."""
    best_val_loss: float | None


class TTTModule(nn.Module):
    """The draft with `forward` = its TTT pass, so DDP/FSDP wrappers see the training forward."""

    def __init__(self, draft: Eagle3DraftModel, ttt_steps: int) -> None:
        super().__init__()
        self.draft = draft
        self.ttt_steps = ttt_steps

    def forward(self, where: torch.Tensor, **tensors: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each TTT step at the positions `where[step]` marks (the loss's valid ones)."""
        return self.draft.forward_ttt(DraftBatch(**tensors), self.ttt_steps, where=list(where))


def train(cfg: TrainConfig, *, source: Source | None = None, on_log: LogHook | None = None) -> TrainResult:
    """Run (or resume) a training job in this process; under torchrun every rank calls this."""
    env = init_distributed(cfg.device, timeout_s=cfg.process_group_timeout_s())
    stop = threading.Event()
    try:
        with _stop_on_sigterm(stop):
            return Trainer(cfg, env, source=source, on_log=on_log, stop=stop).run()
    finally:
        shutdown(env)


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (Kubernetes eviction, torchrun shutdown) asks the loop to checkpoint and leave."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """One training run on one rank."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        *,
        source: Source | None = None,
        on_log: LogHook | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.stop = stop or threading.Event()
        roots = cfg.allowed_roots
        self.output_dir = resolve_allowed(cfg.output_dir, roots, "output_dir")
        check_installed(cfg.report_to)
        self._seed_everything()
        self.use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")

        # Data and the verifier it came from.
        source = source if source is not None else open_source(cfg.data, roots)
        cache, reopen_cache = stream_cache(cfg.data, source, env, roots)
        self.data = TrainData(
            source,
            env,
            validation_fraction=cfg.data.validation_fraction,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            max_validation_examples=cfg.data.max_validation_examples,
            cache=cache,
            reopen_cache=reopen_cache,
        )
        self.verifier_path = verifier_path = resolve_verifier(cfg.verifier, roots)
        verifier_config = load_verifier_config(cfg.verifier, roots)
        aux_layer_ids = data_aux_layers(self.data.meta(), verifier_config, cfg.verifier.name_or_path)

        # Resume point (known before the vocabulary: a resumed stream keeps its checkpoint's).
        self.checkpointer = Checkpointer(self.output_dir, env, cfg.distributed, cfg.keep_checkpoints)
        resume_from = self._resume_point()

        # The draft: vocabulary from token counts, frozen parts copied from the verifier.
        vocab_size = int(verifier_config.get_text_config().vocab_size)
        check_draft(cfg.draft, verifier_config)
        # A resumed run continues its own checkpoint; initFrom only starts a new one. Either carries
        # d2t/t2d, so no counts (and, for a stream, no window) are taken.
        init_from = cfg.draft.init_from if resume_from is None else None
        counts = (
            {}
            if init_from
            else vocab_counts(cfg, self.data, vocab_size, roots, resumed=resume_from is not None)
        )
        t2d, d2t = build_vocab_mapping(counts, vocab_size, cfg.draft.draft_vocab_size)
        self.draft = Eagle3DraftModel.from_training_args(
            verifier_config,
            t2d,
            d2t,
            verifier_name_or_path=verifier_reference(cfg.verifier, verifier_path),
            verifier_weights=verifier_path,
            aux_layer_ids=aux_layer_ids,
            **draft_options(cfg.draft),
        )
        head_dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        self.head = VerifierHead.from_pretrained(verifier_path, dtype=head_dtype, device=env.device)
        self.loss_spec = LossSpec(
            cfg.draft.algorithm, cfg.ttt_step_loss_decay, cfg.hass_topk, cfg.hass_topk_weight
        )

        # Resumed weights (d2t/t2d included) go into the plain module before any wrapper shards it.
        started: Path | None = None
        if resume_from is not None:
            self.draft.load_weights(resume_from / "model.safetensors")
        elif init_from:
            started = start_from(
                self.draft,
                init_from,
                cfg.draft.init_from_revision,
                roots,
                int(verifier_config.get_text_config().num_hidden_layers),
            )
        self.draft.to(env.device)
        self.model = wrap(TTTModule(self.draft, cfg.ttt_steps), env, cfg.distributed)
        self.params = trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)

        self.step, self.epoch, self.consumed = 0, 0, 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.validated_step: int | None = None
        """The step validation last ran at (checkpointed: a resumed run does not run it twice)."""
        self.total_steps = 0
        self._last_grad_norm = 0.0
        self._nonfinite_steps = 0
        if resume_from is not None:
            self._restore(resume_from)
        else:
            self.total_steps = self._plan_total_steps()
        self.monitor = Monitor(
            self.output_dir,
            enabled=env.is_main,
            total_steps=self.total_steps,
            start_step=self.step,
            trackers=self._trackers if cfg.report_to else None,
            hook=on_log,
        )
        if resume_from is not None:
            skipped = (
                " (draft.initFrom not applied: a resumed run keeps its own weights)"
                if cfg.draft.init_from
                else ""
            )
            self.monitor.write(
                f"resumed from {resume_from} at step {self.step} (epoch {self.epoch}){skipped}"
            )
        elif init_from:
            self.monitor.write(f"draft.initFrom: starting from the weights of {init_from} ({started})")
        self.progress = Progress(env.rank, self.total_steps, self.step)
        self.metrics_server = self._serve_progress()

    # ------------------------------------------------------------------ setup helpers

    def _serve_progress(self) -> MetricsServer | None:
        port, host = self.cfg.metrics.port_of(self.env.local_rank), self.cfg.metrics.host
        if port is None:
            return None
        server = MetricsServer(port, self.progress, host)
        log.info("rank %d: progress metrics on %s:%d/metrics", self.env.rank, host, server.port)
        return server

    def _trackers(self) -> Trackers:
        return Trackers(
            self.cfg.report_to,
            self.output_dir,
            run_name=self.cfg.run_name or self.output_dir.name,
            tags=self.cfg.run_tags,
            config=self.cfg.model_dump(mode="json", by_alias=True),
        )

    def _seed_everything(self) -> None:
        """Same seed on every rank: identical draft initialization before DDP even broadcasts it."""
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)

    def _resume_point(self) -> Path | None:
        """The newest intact checkpoint (rank 0 sets newer damaged ones aside before the others look)."""
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.output_dir)
            (self.output_dir / "train_config.yaml").write_text(dump_config(self.cfg))
            if self.cfg.resume != "never":
                resume_checkpoint(self.output_dir)
        barrier(self.env)
        latest = latest_checkpoint(self.output_dir)
        if latest is not None and self.cfg.resume == "never":
            raise ValueError(
                f"output_dir: {self.output_dir} already holds checkpoints ({latest.name}); "
                "set resume: auto to continue it or choose another output_dir"
            )
        return latest

    def _restore(self, path: Path) -> None:
        trainer = self.checkpointer.read_trainer(path)
        rank = self.checkpointer.restore(path, self.model, self.optimizer)
        self.step = int(trainer["step"])
        # The schedule length stays fixed unless the settings that define it changed.
        same_plan = trainer.get("plan") == self._plan_key()
        self.total_steps = int(trainer["total_steps"]) if same_plan else self._plan_total_steps()
        self.best_val_loss = trainer.get("best_val_loss")
        self.best_step = trainer.get("best_step")
        self.validated_step = trainer.get("validated_step")
        self.epoch = int(rank["epoch"])
        self.consumed = int(rank["consumed"])

    def _plan_key(self) -> dict[str, Any]:
        cfg = self.cfg
        keys = ("max_steps", "epochs", "tokens_per_step", "max_seq_len", "batching")
        return {k: getattr(cfg, k) for k in keys}

    def _plan_total_steps(self) -> int:
        """max_steps, else epochs x the batches of epoch 0 (the fewest over ranks: they stop together)."""
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        if not self.data.partitioned:
            raise ValueError("max_steps is required for streamed data (a stream has no known length)")
        per_rank = count_batches(
            self.data.epoch(0), self.cfg.batching, self.cfg.tokens_per_step, self.cfg.max_seq_len
        )
        fewest = int(all_reduce(torch.tensor([per_rank], dtype=torch.long), self.env, op="min").item())
        if fewest == 0:
            raise ValueError("data: no trainable examples (every example is empty or fully masked)")
        return fewest * self.cfg.epochs

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        window = self._zero_sums()
        window_tokens = 0
        window_start = time.perf_counter()
        interrupted = False
        try:
            while self.step < self.total_steps and (cfg.max_steps is not None or self.epoch < cfg.epochs):
                epoch_batches = self._epoch_batches()
                exhausted = False
                first_step = self.step
                try:
                    for batch in _with_end(epoch_batches):
                        device_batch = self._to_device(batch.batch) if batch is not None else None
                        targets = (
                            step_targets(device_batch, self.head, self.draft.t2d, cfg.ttt_steps)
                            if device_batch is not None
                            else None
                        )
                        have, stop, denominators = self._agree(targets)
                        if stop:
                            interrupted = True
                            break
                        if not have:
                            exhausted = True
                            break
                        if self.step >= self.total_steps:
                            break
                        assert batch is not None and device_batch is not None and targets is not None
                        window += self._train_step(device_batch, targets, denominators)
                        window_tokens += batch.num_tokens
                        self.step += 1
                        self.consumed += batch.consumed
                        self.monitor.advance()
                        self.progress.advance(self.step, self.epoch)
                        if self.step % cfg.log_every == 0:
                            self._log_train(window, window_tokens, time.perf_counter() - window_start)
                            window, window_tokens, window_start = self._zero_sums(), 0, time.perf_counter()
                        if self.step % cfg.eval_every == 0:
                            self._validate()
                        if self.step % cfg.checkpoint_every == 0:
                            self._checkpoint()
                finally:
                    epoch_batches.close()
                if interrupted or not exhausted:
                    break
                if self.step == first_step and self.consumed == 0:
                    raise ValueError(f"data: epoch {self.epoch} produced no trainable batch on some rank")
                self.epoch, self.consumed = self.epoch + 1, 0
                if not self.data.replayable:
                    self.monitor.write(f"the stream ended after {self.step} steps")
                    break
            return self._finish(interrupted)
        finally:
            self.monitor.close()
            if self.metrics_server is not None:
                self.metrics_server.close()

    def _epoch_batches(self) -> Prefetcher[PackedBatch] | _Inline:
        examples = self.data.epoch(self.epoch, skip=self.consumed)
        made = batches(examples, self.cfg.batching, self.cfg.tokens_per_step, self.cfg.max_seq_len)
        return Prefetcher(made, self.cfg.data.prefetch) if self.cfg.data.prefetch > 0 else _Inline(made)

    def _agree(
        self, targets: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> tuple[bool, bool, torch.Tensor]:
        """(all ranks have a batch, any rank must stop, world token count per TTT step / world size)."""
        steps = self.cfg.ttt_steps
        counts = (
            step_valid_counts(targets) if targets is not None else torch.zeros(steps, dtype=torch.float64)
        )
        flags = torch.tensor([float(targets is not None), float(self.stop.is_set())], dtype=torch.float64)
        sync = all_reduce(torch.cat([flags.to(counts.device), counts]), self.env)
        have = int(sync[0].item()) == self.env.world_size
        return have, bool(sync[1].item() > 0), sync[2:] / self.env.world_size

    def _train_step(
        self, batch: DraftBatch, targets: list[tuple[torch.Tensor, torch.Tensor]], denominators: torch.Tensor
    ) -> torch.Tensor:
        """One optimizer step; returns the metric sums of this batch."""
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.cfg.optim))
        with self._autocast():
            logits = self.model(_valid(targets), **_tensors(batch))
            loss, sums = draft_loss(logits, targets, denominators, self.loss_spec)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self._nonfinite_steps = 0
        else:
            self._nonfinite_steps += 1
            self.monitor.write(f"step {self.step}: non-finite gradient norm, update skipped")
            if self._nonfinite_steps >= MAX_NONFINITE_STEPS:
                raise NonFiniteError(
                    f"step {self.step}: the gradient was not finite {MAX_NONFINITE_STEPS} steps in a row, "
                    "so training diverged; no model is published (lower optim.lr or optim.weightDecay, "
                    "or check the data)"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self._last_grad_norm = float(grad_norm)
        return sums

    # ------------------------------------------------------------------ evaluation, logging, checkpoints

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics over every rank's held-out examples; None without validation data.

        Ranks run forwards in lockstep (FSDP needs every rank in every forward); a rank that ran
        out of batches runs a two-token dummy batch whose results it drops.
        """
        sums = self._zero_sums()
        made = batches(
            self.data.validation(), self.cfg.batching, self.cfg.tokens_per_step, self.cfg.max_seq_len
        )
        self.model.eval()
        try:
            while True:
                batch = next(made, None)
                pending = all_reduce(torch.tensor([float(batch is not None)]), self.env)
                if pending.item() == 0:
                    break
                device_batch = self._to_device(batch.batch if batch is not None else self._dummy_batch())
                targets = step_targets(device_batch, self.head, self.draft.t2d, self.cfg.ttt_steps)
                with self._autocast():
                    logits = self.model(_valid(targets), **_tensors(device_batch))
                    _, batch_sums = draft_loss(logits, targets, step_valid_counts(targets), self.loss_spec)
                if batch is not None:
                    sums += batch_sums
        finally:
            self.model.train()
        all_reduce(sums, self.env)
        if sums[METRICS.index("tokens")].sum() == 0:
            return None
        return summarize(sums.cpu(), self.cfg.ttt_step_loss_decay)

    def _validate(self) -> None:
        self.validated_step = self.step
        metrics = self.evaluate()
        if metrics is None:
            return
        improved = self.best_val_loss is None or metrics["loss"] < self.best_val_loss
        self.progress.record("eval", metrics)
        self.monitor.record("eval", self.step, {"epoch": self.epoch, **metrics, "best": improved})
        if improved:
            self.best_val_loss, self.best_step = metrics["loss"], self.step
            self.checkpointer.publish("best", self.draft)

    def _log_train(self, window: torch.Tensor, tokens: int, seconds: float) -> None:
        reduced = all_reduce(torch.cat([window.flatten(), window.new_tensor([float(tokens)])]), self.env)
        sums = reduced[:-1].view_as(window).cpu()
        metrics = summarize(sums, self.cfg.ttt_step_loss_decay)
        metrics.update(
            epoch=self.epoch,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=self._last_grad_norm,
            tokens_per_s=float(reduced[-1]) / max(seconds, 1e-9),
        )
        self.progress.record("train", metrics)
        self.monitor.record("train", self.step, metrics)

    def _checkpoint(self) -> Path:
        trainer = {
            "total_steps": self.total_steps,
            "plan": self._plan_key(),
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "validated_step": self.validated_step,
            "config": self.cfg.model_dump(mode="json"),
        }
        rank = {"epoch": self.epoch, "consumed": self.consumed}
        return self.checkpointer.save(self.step, self.model, self.draft, self.optimizer, trainer, rank)

    def _finish(self, interrupted: bool) -> TrainResult:
        # The last validation before the last checkpoint, so that the checkpoint records its best
        # and a rerun of a finished run validates nothing again.
        validated = not interrupted and self.validated_step != self.step
        if validated:
            self._validate()
        latest = latest_checkpoint(self.output_dir)
        if validated or latest is None or latest.name != f"step-{self.step:08d}":
            latest = self._checkpoint()
        final = best = None
        dropped = getattr(self.data.source, "dropped", [])
        if dropped:
            shown = "; ".join(f"{f} ({why})" for f, why in dropped[:5])
            self.monitor.write(f"dropped {len(dropped)} damaged shard(s), their examples skipped: {shown}")
        if interrupted:
            self.monitor.write(f"stopped at step {self.step}; checkpoint {latest} (rerun to resume)")
        else:
            final = self.checkpointer.publish("final", self.draft)
            self.monitor.write(f"done: {self.step} steps; model in {final}")
            served = self.output_dir / "best" if self.best_step is not None else final
            k = self.cfg.draft.speculative_tokens
            self.monitor.write(
                "serve it: "
                + vllm_serve_command(
                    verifier_reference(self.cfg.verifier, self.verifier_path), str(served), k
                )
            )
        if self.best_step is not None and (self.output_dir / "best").is_dir():
            best = self.output_dir / "best"
        return TrainResult(self.step, interrupted, latest, final, best, self.best_val_loss)

    # ------------------------------------------------------------------ small helpers

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(len(METRICS), self.cfg.ttt_steps, dtype=torch.float64, device=self.env.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: DraftBatch) -> DraftBatch:
        """Move to the training device; hidden states in fp32 (autocast picks bf16 where it pays)."""
        moved = batch.to(self.env.device)
        moved.aux_hidden = moved.aux_hidden.float()
        moved.last_hidden = moved.last_hidden.float()
        return moved

    def _dummy_batch(self) -> DraftBatch:
        aux = self.draft.config.num_aux_layers
        hidden = int(self.draft.config.target_hidden_size or self.draft.config.layer_config.hidden_size)
        zeros = torch.zeros(1, 2, dtype=torch.long)
        return DraftBatch(
            input_ids=zeros,
            aux_hidden=torch.zeros(1, 2, aux, hidden),
            last_hidden=torch.zeros(1, 2, hidden),
            loss_mask=torch.zeros(1, 2, dtype=torch.bool),
            position_ids=torch.arange(2)[None],
            document_ids=zeros.clone(),
        )


class _Inline(Iterator[PackedBatch]):
    """The Prefetcher's interface without a thread (data.prefetch = 0)."""

    def __init__(self, source: Iterator[PackedBatch]) -> None:
        self._source = source

    def __next__(self) -> PackedBatch:
        return next(self._source)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


def _with_end(items: Iterable[PackedBatch]) -> Iterator[PackedBatch | None]:
    """The items, then None forever: a rank out of data keeps joining the per-step agreement."""
    yield from items
    while True:
        yield None


def _valid(targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """bool [steps, B, T]: where each TTT step has a target (only there are logits computed)."""
    return torch.stack([valid for _, valid in targets])


def _tensors(batch: DraftBatch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


def check_draft(draft: DraftConfig, verifier_config: Any) -> None:
    """ConfigError naming the `draft.` field that cannot be built for this verifier."""
    text = verifier_config.get_text_config()
    vocab_size, verifier_hidden = int(text.vocab_size), int(text.hidden_size)
    if draft.draft_vocab_size > vocab_size:
        raise ConfigError(
            f"draft.draftVocabSize: {draft.draft_vocab_size} exceeds the verifier vocabulary "
            f"({vocab_size} tokens); set it to at most {vocab_size}"
        )
    unservable = unservable_draft(verifier_config, draft.num_layers)
    if unservable:
        raise ConfigError(f"draft.numLayers: {unservable}")
    if draft.init_from_verifier and draft.hidden_size not in (None, verifier_hidden):
        raise ConfigError(
            f"draft.hiddenSize: {draft.hidden_size} differs from the verifier's {verifier_hidden}, "
            "and draft.initFromVerifier copies the verifier's layers: use one or the other"
        )


def draft_options(draft: DraftConfig) -> dict[str, Any]:
    """The architecture keywords of `Eagle3DraftModel.from_training_args` / `training_config`
    that `draft:` sets (the trainer builds with them; `specops plan` counts the same draft)."""
    names = (
        "algorithm",
        "num_layers",
        "layer_style",
        "norm_before_residual",
        "speculative_tokens",
        "init_from_verifier",
        "hidden_size",
        "norm_before_fc",
        "fc_norm",
        "norm_output",
        "layer_types",
        "sliding_window",
    )
    return {name: getattr(draft, name) for name in names}


def data_aux_layers(meta: StoreMeta | None, verifier_config: Any, verifier_name: str) -> list[int]:
    """The auxiliary layers the data captured (checked against the verifier), else EAGLE-3's default."""
    text = verifier_config.get_text_config()
    num_layers = int(text.num_hidden_layers)
    if meta is None:
        return default_layer_ids(num_layers)[:3]
    problems = []
    if meta.hidden_size != int(text.hidden_size):
        problems.append(f"hidden size {meta.hidden_size} != verifier {text.hidden_size}")
    if meta.vocab_size != int(text.vocab_size):
        problems.append(f"vocab size {meta.vocab_size} != verifier {text.vocab_size}")
    if meta.num_layers != num_layers or not meta.layer_ids or meta.layer_ids[-1] != num_layers:
        problems.append(
            f"layer ids {list(meta.layer_ids)} of a {meta.num_layers}-layer model; the last must be the "
            f"verifier's final output ({num_layers})"
        )
    if problems:
        raise ValueError(
            f"data: examples were not produced by verifier {verifier_name!r}: " + "; ".join(problems)
        )
    return list(meta.layer_ids[:-1])
