"""Checkpoints: a speculators-format model directory plus the training state needed to resume.

    <output_dir>/checkpoints/step-00000100/
        config.json, model.safetensors        the draft, loadable by vLLM as is
        state/trainer.json                    step, epoch, schedule, best validation, world size
        state/optimizer.{safetensors,json}    full AdamW state keyed by parameter name
        state/rank-00000.{safetensors,json}   per-rank RNG states and data position
    <output_dir>/best/, <output_dir>/final/   model-only directories to serve

Every directory is built under a `.tmp-` name, fsynced and renamed when complete (then its
parent is fsynced), so a process killed at any moment, or a power cut, leaves either the previous
checkpoint or the new one, never half of one; a full disk stops the run with `DiskFull` and
leaves only a `.tmp-` directory that the next start removes. `trainer.json`, written last, records
the size and xxh3 digest of every other file. Resuming takes the newest checkpoint whose files
still match (`resume_checkpoint`): newer damaged ones are set aside as `<name>.damaged` with a
warning. A model with an inf or NaN in any tensor is never written (`NonFiniteError`): nothing
downstream gets a diverged draft to serve.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from specops import exitcodes
from specops.models.base import SpeculatorModel
from specops.stores.atomic import disk_full_as_error, fsync_dir, fsync_tree
from specops.stores.digests import ALGORITHMS, algorithm_of, file_digest
from specops.train.distributed import DistEnv, Strategy, barrier
from specops.train.state_io import StateFormatError, load_tree, read_json, save_tree, write_json

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state"
TRAINER_FILE = "trainer.json"
FILES = "files"
"""trainer.json's record of every other file: relative path -> {nbytes, digest}."""
DAMAGED_SUFFIX = ".damaged"
PUBLISHED = ("best", "final")
"""Model-only directories `publish` writes beside the checkpoints."""
_STEP_RE = re.compile(r"^step-(\d{8})$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / STATE / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointError(exitcodes.DataError):
    """No checkpoint in the output directory can be resumed from: every one is damaged."""


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and xxh3 digest of every file under `directory` but trainer.json (which holds them)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != f"{STATE}/{TRAINER_FILE}":
            records[rel] = {"nbytes": path.stat().st_size, "digest": file_digest(path, "xxh3-128")}
    return records


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a file missing, cut short or changed since
    it was written), or None. Checkpoints written before files were recorded are checked by loading."""
    try:
        trainer = read_json(path / STATE / TRAINER_FILE)
    except StateFormatError as exc:
        return str(exc).removeprefix(f"{path}/")
    if not isinstance(trainer, dict):
        return f"{STATE}/{TRAINER_FILE}: not a JSON object"
    files = trainer.get(FILES, {})
    if not isinstance(files, dict):
        return f"{STATE}/{TRAINER_FILE}: {FILES} is not an object"
    for rel, record in files.items():
        digest = record.get("digest") if isinstance(record, dict) else None
        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts
        if not inside or not isinstance(digest, str) or digest.partition(":")[0] not in ALGORITHMS:
            return f"{STATE}/{TRAINER_FILE}: the {FILES} record of {rel!r} is malformed"
        try:
            size = (path / rel).stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != record.get("nbytes"):
            return f"{rel} holds {size} bytes, {record.get('nbytes')} were written"
        found = file_digest(path / rel, algorithm_of(digest))
        if found != digest:
            return f"{rel} has digest {found}, {digest} was written"
    return None


def resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem` (rank 0, before the others look).

    Newer damaged ones are renamed to `<name>.damaged` (kept for inspection, out of every later
    listing) with a warning; when every checkpoint is damaged nothing is renamed and
    `CheckpointError` names them, since starting over silently would throw the run away.
    """
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                aside = bad.with_name(bad.name + DAMAGED_SUFFIX)
                log.warning(
                    "checkpoint %s is damaged (%s); resuming from %s, it is kept as %s",
                    bad,
                    why,
                    path.name,
                    aside.name,
                )
                shutil.rmtree(aside, ignore_errors=True)
                bad.rename(aside)
            if damaged:
                fsync_dir(path.parent)
            return path
        damaged.append((path, problem))
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"{output_dir / CHECKPOINTS}: no intact checkpoint to resume from ({listed}); move them "
            "away to start over, or choose another output_dir"
        )
    return None


def remove_partial(output_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of a process killed while writing (call on rank 0 before training)."""
    for parent in (output_dir, output_dir / CHECKPOINTS):
        if parent.is_dir():
            for leftover in parent.glob(".tmp-*"):
                log.info("removing incomplete %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteError(exitcodes.Diverged):
    """Training diverged (an inf or NaN): the run stops instead of publishing a broken draft."""


def check_finite(tensors: Mapping[str, Any], directory: Path) -> None:
    """Refuse to write `directory` when a floating-point tensor holds an inf or NaN (naming it)."""
    bad = [
        name
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteError(
            f"{directory}: not written, the model is not finite in {', '.join(bad[:4])}"
            f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''} (training diverged)"
        )


def save_model(draft: SpeculatorModel, env: DistEnv, strategy: Strategy, directory: Path) -> None:
    """Write the speculators-format model (collective under FSDP; only rank 0 writes)."""
    if strategy == "fsdp" and env.distributed:
        full = get_model_state_dict(draft, options=_FULL)
        if env.is_main:
            check_finite(full, directory)
            plain = type(draft)(draft.config)
            plain.load_state_dict(full, strict=True)
            plain.save_pretrained(directory)
    elif env.is_main:
        check_finite(draft.state_dict(), directory)
        draft.save_pretrained(directory)


@contextlib.contextmanager
def _building(tmp: Path, final: Path, env: DistEnv) -> Iterator[None]:
    """A checkpoint directory under construction: a full disk is one `DiskFull` line, and the
    temp directory of a failed write is removed (rank 0; a killed process leaves it to `remove_partial`)."""
    try:
        with disk_full_as_error(final, "a checkpoint"):
            yield
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into(tmp: Path, final: Path) -> None:
    """Replace directory `final` by `tmp` (rename; the old one is removed afterwards). A crash between
    the two renames leaves only `.tmp-old-<name>`; `recover_published` puts it back."""
    old = _previous(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _previous(final: Path) -> Path:
    return final.with_name(f".tmp-old-{final.name}")


def recover_published(output_dir: Path, names: tuple[str, ...] = PUBLISHED) -> None:
    """Undo a swap cut short: restore `<name>` from `.tmp-old-<name>` when `<name>` is missing,
    else drop the leftover (the swap had finished)."""
    for name in names:
        final, old = output_dir / name, _previous(output_dir / name)
        if not old.exists():
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
            fsync_dir(output_dir)


class Checkpointer:
    """Writes and reads checkpoints for one run; every rank calls every method (they synchronize)."""

    def __init__(self, output_dir: Path, env: DistEnv, strategy: Strategy, keep: int) -> None:
        self.output_dir = output_dir
        self.env = env
        self.strategy = strategy
        self.keep = keep
        if env.is_main and output_dir.is_dir():
            recover_published(output_dir)

    def save(
        self,
        step: int,
        model: nn.Module,
        draft: SpeculatorModel,
        optimizer: torch.optim.Optimizer,
        trainer: dict[str, Any],
        rank: dict[str, Any],
    ) -> Path:
        """Commit `checkpoints/step-N` holding model, optimizer, trainer and this rank's state."""
        env = self.env
        final = self.output_dir / CHECKPOINTS / step_dir_name(step)
        tmp = final.with_name(f".tmp-{final.name}")
        with _building(tmp, final, env):
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / STATE).mkdir(parents=True)
            barrier(env)
            save_tree(tmp / STATE, f"rank-{env.rank:05d}", {**rank, "rng": rng_state()})
            save_model(draft, env, self.strategy, tmp)
            if self.strategy == "fsdp" or env.is_main:
                optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
                if env.is_main:
                    save_tree(tmp / STATE, "optimizer", optim_state)
            barrier(env)
            if env.is_main:
                record = {**trainer, "step": step, "world_size": env.world_size, FILES: file_records(tmp)}
                write_json(tmp / STATE / TRAINER_FILE, record)
                fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                fsync_dir(final.parent)
                for old in complete_checkpoints(self.output_dir)[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier(env)
        return final

    def publish(self, name: str, draft: SpeculatorModel) -> Path:
        """Write the model alone to `<output_dir>/<name>` (e.g. best, final)."""
        final = self.output_dir / name
        tmp = self.output_dir / f".tmp-{name}"
        with _building(tmp, final, self.env):
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            save_model(draft, self.env, self.strategy, tmp)
            if self.env.is_main:
                fsync_tree(tmp)
                _swap_into(tmp, final)
                fsync_dir(self.output_dir)
        barrier(self.env)
        return final

    def read_trainer(self, path: Path) -> dict[str, Any]:
        """trainer.json of a checkpoint, checked against this world."""
        data = read_json(path / STATE / TRAINER_FILE)
        if not isinstance(data, dict):
            raise StateFormatError(f"{path / STATE / TRAINER_FILE}: expected a JSON object")
        saved_world = data.get("world_size")
        if saved_world != self.env.world_size:
            raise StateFormatError(
                f"{path}: written by a world of {saved_world} processes, this run has {self.env.world_size}; "
                "resume with the same number of processes or start a new output_dir"
            )
        return data

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load optimizer state (model weights are loaded before wrapping) and this rank's state."""
        optim_state = load_tree(path / STATE, "optimizer")
        set_optimizer_state_dict(
            model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
        )
        rank = load_tree(path / STATE, f"rank-{self.env.rank:05d}")
        if not isinstance(rank, dict) or "rng" not in rank:
            raise StateFormatError(f"{path / STATE}: rank-{self.env.rank:05d} state lacks its RNG section")
        set_rng_state(rank.pop("rng"))
        return rank
