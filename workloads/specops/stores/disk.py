"""DiskStore: examples in safetensors shards under one directory, many writers, no locks.

Writers (local worker processes or Kubernetes Indexed-Job pods on one shared volume) each own
their file names: `shard-wNNNNN-SSSSS.safetensors[.zst]`, `manifest-wNNNNN.json`,
`tokens-wNNNNN.json` and temp files `.tmp-wNNNNN-*`. A shard is committed when its writer's
manifest lists it; readers merge every writer manifest. A writer killed at any point loses only
uncommitted work, which the next run regenerates (`done_ids()` is exactly what manifests list);
a torn manifest counts as such a crash. Every read checks the shard's digest. See
docs/storage.md for the format and the guarantees.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, cast

import torch

from specops.exitcodes import DataError
from specops.paths import resolve_allowed
from specops.stores import manifest as mf
from specops.stores.atomic import disk_full_as_error, temp_path
from specops.stores.base import StoreMeta
from specops.stores.digests import Algorithm, algorithm_of, digest_mismatch, file_digest
from specops.stores.manifest import Manifest, ManifestError, ShardEntry, StoreMetaMismatchError, TokenCounts
from specops.stores.shards import (
    Compression,
    ShardError,
    check_example,
    decode_shard,
    iter_examples,
    loss_token_counts,
    present_fields,
    read_shard_bytes,
    shard_token_counts,
    validate_shard,
    write_shard,
)

if TYPE_CHECKING:
    from specops.config import RunConfig, SyncConfig
    from specops.example import ExampleDict

log = logging.getLogger(__name__)
Verify = Literal["size", "digest"]


class TooManyDroppedShardsError(DataError):
    """More shards failed their checks than the reader tolerates (`data.max_dropped_shards`)."""


@dataclass
class _View:
    """The committed shards readers see: manifest-listed files that passed the checks."""

    meta: StoreMeta
    entries: dict[str, ShardEntry] = field(default_factory=dict)
    """Partition key (shard file name) -> entry, in canonical (writer, sequence) order."""
    owner: dict[str, str] = field(default_factory=dict)
    """Example id -> the one shard that serves it (the first that lists it)."""
    files_by_manifest: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of listed shards that failed the checks (at open or on a read)."""
    skipped_manifests: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of writer manifests that could not be parsed (torn, truncated)."""

    def add(self, manifest_file: str, entry: ShardEntry) -> None:
        self.entries[entry.file] = entry
        self.files_by_manifest.setdefault(manifest_file, []).append(entry.file)
        for ex_id in entry.ids:
            self.owner.setdefault(ex_id, entry.file)


def _shard_problem(path: Path, entry: ShardEntry, verify: Verify) -> str | None:
    """Why a listed shard cannot be served (missing, wrong size, wrong digest), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != entry.nbytes:
        return f"size {size} bytes, manifest says {entry.nbytes}"
    if verify == "digest":
        found = file_digest(path, algorithm_of(entry.digest))
        if found != entry.digest:
            return digest_mismatch(found, entry.digest)
    return None


def _load_manifests(root: Path) -> tuple[dict[str, Manifest], list[tuple[str, str]]]:
    """(writer manifests by file name in writer order, (file, reason) of unparsable ones); the
    merged manifest only when there are no writer manifests.

    A torn or unparsable writer manifest is what a crash before its first commit leaves, so it is
    skipped with a warning instead of failing the whole store; its writer redoes its shards.
    """
    writers = sorted(
        (int(m.group(1)), name) for name in os.listdir(root) if (m := mf.WRITER_MANIFEST_RE.match(name))
    )
    if not writers:
        merged = root / mf.MERGED_MANIFEST
        return ({mf.MERGED_MANIFEST: mf.load_manifest(merged)} if merged.exists() else {}), []
    found: dict[str, Manifest] = {}
    skipped: list[tuple[str, str]] = []
    for _, name in writers:
        try:
            found[name] = mf.load_manifest(root / name)
        except FileNotFoundError:
            continue  # removed since the listing
        except ManifestError as exc:
            log.warning("%s: skipping %s, it is unreadable (%s); its shards are left out", root, name, exc)
            skipped.append((name, str(exc)))
    return found, skipped


class DiskStore:
    """A directory of shards: a `DataSink` for one writer and a `DataSource` over all writers.

    Partitions are shard file names. `read()` yields examples whose tensors are views into the
    shard buffer, after checking the file's size, header, ids, dtypes and shapes.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        meta: StoreMeta | None,
        writer_index: int = 0,
        num_writers: int = 1,
        shard_size: int = 64,
        compression: Compression = "none",
        allowed_roots: Sequence[str | Path] = (),
        verify: Verify = "digest",
        digest: Algorithm = "xxh3-128",
        max_shard_bytes: int = 1 << 30,
        field: str = "sync.path",
    ) -> None:
        """Open `path` for writing as writer `writer_index` of `num_writers`, resuming its work.

        `verify` is how this writer checks its own committed shards before resuming, each with
        the algorithm its manifest entry records (other writers' shards are size-checked); a bad
        shard is deleted and its examples regenerated. New shards get a `digest` checksum.
        A shard is committed after `shard_size` examples or `max_shard_bytes` of tensors.
        """
        if not 0 <= writer_index < num_writers:
            raise ValueError(f"writer_index={writer_index} must be in [0, num_writers={num_writers})")
        if shard_size < 1 or max_shard_bytes < 1:
            raise ValueError("shard_size and max_shard_bytes must be >= 1")
        if compression not in ("none", "zstd"):
            raise ValueError(f"sync.compression: {compression!r} is not one of 'none', 'zstd'")
        self.path = resolve_allowed(path, allowed_roots, field)
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer: int | None = writer_index
        self._num_writers = num_writers
        self._shard_size = shard_size
        self._max_shard_bytes = max_shard_bytes
        self._compression: Compression = compression
        self._digest: Algorithm = digest
        self._tmp_prefix = f".tmp-{mf.writer_tag(writer_index)}-"
        self._manifest_file = mf.manifest_name(writer_index)
        self._remove_own_temp_files()

        manifests, skipped = _load_manifests(self.path)
        if mf.MERGED_MANIFEST in manifests:
            raise ValueError(
                f"{self.path}: holds only a merged manifest.json; resuming needs the manifest-w*.json files"
            )
        for name, found in manifests.items():
            if meta is None:
                meta = found.meta
            mf.check_meta(found.meta, meta, self.path / name)
        if meta is None:
            raise ValueError(f"{self.path}: no existing manifest to take the StoreMeta from; pass meta")
        self._meta = meta
        own = manifests.get(self._manifest_file)
        if own is None:
            own = Manifest(meta=meta, writer=writer_index, num_writers=num_writers)
            if any(name == self._manifest_file for name, _ in skipped):
                log.warning("%s: redoing every shard of this writer (its manifest is unreadable)", self.path)
                mf.save(self.path / self._manifest_file, own, self._tmp_prefix)
                self._remove_merged_summary()
        manifests[self._manifest_file] = self._recheck_own(own, verify)
        self._own = manifests[self._manifest_file]
        self._remove_orphan_shards()
        self._view = self._build_view(manifests, verify="size")
        self._view.skipped_manifests = [(n, r) for n, r in skipped if n != self._manifest_file]
        self._max_dropped: int | None = None
        self._failed: set[str] = set()
        self._own_counts = self._rebuild_own_counts()
        self._done = set(self._view.owner)
        self._next_seq = 1 + max((mf.shard_sort_key(e.file)[1] for e in self._own.shards), default=-1)
        self._buffer: list[ExampleDict] = []
        self._buffer_ids: set[str] = set()
        self._buffer_bytes = 0
        self._committed_any = False
        self.committed_examples = 0
        """Examples this object committed to shards (live progress: what is stored)."""
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | Path,
        allowed_roots: Sequence[str | Path] = (),
        *,
        verify: Verify = "size",
        field: str = "data.path",
        max_dropped: int | None = None,
    ) -> DiskStore:
        """Read-only view over every committed shard.

        `verify="size"` drops listed shards that are missing or of the wrong size (a stat each);
        `verify="digest"` also hashes every shard now (with the algorithm its manifest entry
        records) and drops those that differ. `read()` always checks the digest.

        `max_dropped=None`: a shard that fails on `read()` raises. An int: it is dropped (logged,
        added to `dropped`, its examples skipped) and `TooManyDroppedShardsError` is raised once
        more than `max_dropped` shards are dropped, counting those dropped at open.
        """
        root = resolve_allowed(path, allowed_roots, field)
        if not root.is_dir():
            raise FileNotFoundError(f"{field}: {root} is not a directory")
        manifests, skipped = _load_manifests(root)
        if not manifests:
            if skipped:
                raise ManifestError(
                    f"{field}: {root} has no readable manifest ({'; '.join(r for _, r in skipped)})"
                )
            raise FileNotFoundError(f"{field}: {root} has no manifest-w*.json or manifest.json")
        names = list(manifests)
        for name in names[1:]:
            mf.check_meta(manifests[name].meta, manifests[names[0]].meta, root / name)
        store = cls.__new__(cls)
        store.path = root
        store._writer = None
        store._meta = manifests[names[0]].meta
        store._view = store._build_view(manifests, verify)
        store._view.skipped_manifests = skipped
        store._done = set(store._view.owner)
        store._closed = True
        store._max_dropped = max_dropped
        store._failed = set()
        store._check_dropped()
        return store

    @classmethod
    def from_config(cls, sync: SyncConfig, run: RunConfig, meta: StoreMeta) -> DiskStore:
        """The sink of input slice `run.shard_index` of `run.num_shards`: one writer per slice
        (local workers arrive as slices of their own, see `generate.worker_config`)."""
        if not sync.path:
            raise ValueError("sync.path is required for disk shards")
        return cls(
            sync.path,
            meta=meta,
            writer_index=run.shard_index,
            num_writers=run.num_shards,
            shard_size=sync.shard_size,
            compression=sync.compression,
            digest=sync.digest,
            allowed_roots=run.allowed_roots,
        )

    # ------------------------------------------------------------------ reading

    @property
    def meta(self) -> StoreMeta:
        return self._meta

    @property
    def dropped(self) -> list[tuple[str, str]]:
        """(shard file, reason) for listed shards left out of this view (at open or on a read)."""
        return list(self._view.dropped)

    @property
    def skipped_manifests(self) -> list[tuple[str, str]]:
        """(manifest file, reason) for writer manifests left out because they are unreadable."""
        return list(self._view.skipped_manifests)

    def __len__(self) -> int:
        return len(self._view.owner)

    def done_ids(self) -> set[str]:
        return set(self._done)

    def partitions(self) -> list[str]:
        return list(self._view.entries)

    def ids(self, partition: str) -> list[str]:
        """Ids of the examples `read(partition)` yields, from the manifest (no shard is read)."""
        entry = self._view.entries.get(partition)
        if entry is None:
            raise KeyError(f"{self.path}: no committed shard {partition!r}")
        return [ex_id for ex_id in entry.ids if self._view.owner[ex_id] == partition]

    def read(self, partition: str) -> Iterator[ExampleDict]:
        entry = self._view.entries.get(partition)
        if entry is None:
            raise KeyError(f"{self.path}: no committed shard {partition!r}")
        if partition in self._failed:
            return
        path = self.path / partition
        try:
            buf = read_shard_bytes(
                path,
                nbytes=entry.nbytes,
                compression=entry.compression,
                raw_nbytes=entry.raw_nbytes,
                digest=entry.digest,
            )
            contents = decode_shard(buf, path)
            validate_shard(contents, path, self._meta, entry.ids, entry.fields)
        except ShardError as exc:
            if self._max_dropped is None:
                raise
            self._drop_on_read(partition, exc)
            return
        owner = self._view.owner
        for ex in iter_examples(contents):
            if owner[ex["id"]] == partition:
                yield ex

    def _drop_on_read(self, partition: str, exc: ShardError) -> None:
        """Leave a shard that failed its checks out of every later read, and count it."""
        reason = str(exc).removeprefix(f"{self.path / partition}: ")
        log.warning("%s: dropping shard %s (%s); its examples are skipped", self.path, partition, reason)
        self._failed.add(partition)
        self._view.dropped.append((partition, reason))
        self._check_dropped()

    def _check_dropped(self) -> None:
        dropped = self._view.dropped
        if self._max_dropped is None or len(dropped) <= self._max_dropped:
            return
        listed = "; ".join(f"{f}: {r}" for f, r in dropped[:3]) + ("; ..." if len(dropped) > 3 else "")
        raise TooManyDroppedShardsError(
            f"{self.path}: {len(dropped)} shards failed their checks, more than "
            f"data.max_dropped_shards={self._max_dropped} allows ({listed})"
        )

    def listed_tokens(self) -> int:
        """Tokens of every committed shard, as the manifests list them (no shard is read)."""
        return sum(entry.num_tokens for entry in self._view.entries.values())

    def token_counts(self) -> dict[int, int]:
        """Occurrences of each token id at loss-masked positions, over every committed shard."""
        total: Counter[int] = Counter()
        for manifest_file, files in self._view.files_by_manifest.items():
            total.update(self._counts_for(manifest_file, files))
        return dict(total)

    def _counts_for(self, manifest_file: str, files: list[str]) -> Counter[int]:
        """Counts of `files`: the writer's cache where it matches, the shards themselves otherwise."""
        valid = {f: self._view.entries[f].digest for f in files}
        cache = mf.load_token_counts(self.path / mf.tokens_name(manifest_file))
        counts: Counter[int] = Counter()
        todo = files
        if cache is not None and all(valid.get(f) == d for f, d in cache.shards.items()):
            counts.update(cache.counts)
            todo = [f for f in files if f not in cache.shards]
        for f in todo:
            if f in self._failed:
                continue
            e = self._view.entries[f]
            try:
                counts.update(shard_token_counts(self.path / f, e.compression, e.nbytes, e.raw_nbytes))
            except ShardError as exc:
                if self._max_dropped is None:
                    raise
                self._drop_on_read(f, exc)
        return counts

    def _build_view(self, manifests: dict[str, Manifest], verify: Verify) -> _View:
        view = _View(meta=self._meta)
        listed = [(name, e) for name, m in manifests.items() for e in m.shards]
        for name, entry in sorted(listed, key=lambda item: mf.shard_sort_key(item[1].file)):
            problem = _shard_problem(self.path / entry.file, entry, verify)
            if problem:
                log.warning(
                    "%s: dropping shard %s (%s); its examples will be regenerated",
                    self.path,
                    entry.file,
                    problem,
                )
                view.dropped.append((entry.file, problem))
            else:
                view.add(name, entry)
        return view

    # ------------------------------------------------------------------ writing

    def write(self, examples: Sequence[ExampleDict]) -> None:
        """Buffer examples, committing a shard whenever one is full. Already stored ids are skipped.

        CPU tensors are kept by reference (no copy) until their shard commits: callers must not
        modify or recycle them after handing them over.
        """
        if self._writer is None:
            raise RuntimeError(f"{self.path}: opened read-only")
        if self._closed:
            raise RuntimeError(f"{self.path}: write() after close()")
        for ex in examples:
            check_example(ex, self._meta)
            if ex["id"] in self._done or ex["id"] in self._buffer_ids:
                log.debug("%s: skipping %s, already stored", self.path, ex["id"])
                continue
            fields = present_fields(ex)
            if self._buffer and fields != present_fields(self._buffer[0]):
                raise ValueError(
                    f"{ex['id']}: carries {list(fields)} but this shard's examples carry "
                    f"{list(present_fields(self._buffer[0]))}"
                )
            tensors = {f: cast(torch.Tensor, ex[f]).detach().cpu().contiguous() for f in fields}  # type: ignore[literal-required]
            self._buffer.append(cast("ExampleDict", {"id": ex["id"], **tensors}))
            self._buffer_ids.add(ex["id"])
            self._buffer_bytes += sum(t.nbytes for t in tensors.values())
            if len(self._buffer) >= self._shard_size or self._buffer_bytes >= self._max_shard_bytes:
                self._commit()

    def close(self) -> None:
        """Commit buffered examples; the store stays readable, writes are refused afterwards."""
        if self._writer is not None and not self._closed:
            self._commit()
        self._closed = True

    def finalize(self) -> bool:
        """Close, mark this writer's slice complete, and write the merged manifest.json once every
        writer `0..num_writers-1` is complete. Returns whether the merged manifest was written."""
        if self._writer is None:
            raise RuntimeError(f"{self.path}: opened read-only")
        self.close()
        self._own = self._own.model_copy(update={"complete": True})
        mf.save(self.path / self._manifest_file, self._own, self._tmp_prefix)
        manifests, _ = _load_manifests(self.path)
        ready = all(
            (m := manifests.get(mf.manifest_name(w))) is not None and m.complete
            for w in range(self._num_writers)
        )
        if not ready:
            return False
        view = self._build_view(manifests, verify="size")
        merged = Manifest(meta=self._meta, complete=True, shards=list(view.entries.values()))
        self._view = view
        counts: Counter[int] = Counter()
        for manifest_file, files in view.files_by_manifest.items():
            counts.update(self._counts_for(manifest_file, files))
        digests = {f: e.digest for f, e in view.entries.items()}
        cache = TokenCounts(shards=digests, counts=dict(counts))
        mf.save(self.path / mf.MERGED_TOKENS, cache, self._tmp_prefix, durable=False)
        mf.save(self.path / mf.MERGED_MANIFEST, merged, self._tmp_prefix)
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """A clean exit finalizes; an exception only commits what is buffered."""
        if exc_type is None and self._writer is not None:
            self.finalize()
        else:
            self.close()

    def _commit(self) -> None:
        if not self._buffer:
            return
        assert self._writer is not None
        examples, fields = self._buffer, present_fields(self._buffer[0])
        name = mf.shard_name(self._writer, self._next_seq, self._compression)
        final = self.path / name
        tmp = temp_path(final, self._tmp_prefix)
        with disk_full_as_error(final, "a shard"):
            try:
                written = write_shard(tmp, examples, fields, self._compression, self._digest)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        # No directory fsync here: the manifest save below fsyncs this same directory after its
        # own rename, which makes this rename durable too. A power cut that keeps the manifest
        # but not this rename leaves a listed shard missing, which readers drop and the writer
        # regenerates.
        entry = ShardEntry(
            file=name,
            digest=written.digest,
            nbytes=written.nbytes,
            raw_nbytes=written.raw_nbytes,
            compression=self._compression,
            num_tokens=written.num_tokens,
            fields=fields,
            ids=tuple(ex["id"] for ex in examples),
        )
        updated = self._own.model_copy(
            update={"shards": [*self._own.shards, entry], "complete": False, "num_writers": self._num_writers}
        )
        try:
            mf.save(self.path / self._manifest_file, updated, self._tmp_prefix)
        except BaseException:
            final.unlink(missing_ok=True)  # never listed (e.g. the disk filled up): not committed
            raise
        # Committed: this object's state follows before anything else can fail, so a later error
        # (the cache below on a full disk) cannot make close() store these examples a second time.
        self._own = updated
        self._view.add(self._manifest_file, entry)
        self._done.update(entry.ids)
        self.committed_examples += len(entry.ids)
        self._next_seq += 1
        self._buffer, self._buffer_ids, self._buffer_bytes = [], set(), 0
        vocab_ids, vocab_counts = loss_token_counts(examples)
        self._own_counts.update(dict(zip(vocab_ids.tolist(), vocab_counts.tolist(), strict=True)))
        if not self._committed_any:
            self._remove_merged_summary()
            self._committed_any = True
        self._save_own_counts()

    # ------------------------------------------------------------------ resume housekeeping

    def _recheck_own(self, own: Manifest, verify: Verify) -> Manifest:
        """Drop (and delete) this writer's shards that fail the checks, so they get regenerated."""
        good = []
        for entry in own.shards:
            problem = _shard_problem(self.path / entry.file, entry, verify)
            if problem is None:
                good.append(entry)
                continue
            log.warning("%s: shard %s is bad (%s); regenerating its examples", self.path, entry.file, problem)
            (self.path / entry.file).unlink(missing_ok=True)
        if len(good) == len(own.shards):
            return own
        fixed = own.model_copy(update={"shards": good, "complete": False})
        mf.save(self.path / self._manifest_file, fixed, self._tmp_prefix)
        self._remove_merged_summary()
        return fixed

    def _remove_own_temp_files(self) -> None:
        """Temp files of this writer are uncommitted leftovers of a killed run."""
        for name in os.listdir(self.path):
            if name.startswith(self._tmp_prefix):
                (self.path / name).unlink(missing_ok=True)

    def _remove_orphan_shards(self) -> None:
        """Shards this writer renamed into place but never listed (killed before the manifest)."""
        listed = {e.file for e in self._own.shards}
        for name in os.listdir(self.path):
            match = mf.SHARD_RE.match(name)
            if match and int(match.group(1)) == self._writer and name not in listed:
                (self.path / name).unlink(missing_ok=True)

    def _remove_merged_summary(self) -> None:
        """manifest.json/tokens.json describe a finished store; this one is changing again."""
        for name in (mf.MERGED_MANIFEST, mf.MERGED_TOKENS):
            (self.path / name).unlink(missing_ok=True)

    def _rebuild_own_counts(self) -> Counter[int]:
        files = self._view.files_by_manifest.get(self._manifest_file, [])
        return self._counts_for(self._manifest_file, files)

    def _save_own_counts(self) -> None:
        digests = {e.file: e.digest for e in self._own.shards}
        cache = TokenCounts(shards=digests, counts=dict(self._own_counts))
        # Only a cache, checked against the manifest's digests on every read: not worth an fsync.
        mf.save(self.path / mf.tokens_name(self._manifest_file), cache, self._tmp_prefix, durable=False)


__all__ = ["DiskStore", "StoreMetaMismatchError"]
