"""The trainer's data input: train/validation example iterables over any source.

Validation holds out whole conversations (`specops.data.split.HeldOutSplit`, the split every
evaluation uses too), whatever partition or stream position their examples arrive in. A
partitioned `DataSource` (DiskStore shards, upstream speculators files) is replayable: each epoch
reshuffles it through `GeneratedDataset` and drops the held-out examples, validation reads only the
partitions that hold the first `max_validation_examples` held-out ones (known from the manifest's
ids, so a validation pass does not read the whole dataset), and resume fast-forwards by counting
examples. A `StreamSource` (queue, broker) is read once: held-out examples are diverted into a
bounded in-memory validation set, and with `cache` the first pass is teed into a DiskStore that
later epochs replay. A stream carries no token counts, so its draft vocabulary comes from a window:
each rank holds its first examples, the ranks sum their counts (every rank then picks the same
vocabulary), and epoch 0 yields the held examples before the rest of the stream, so each is trained
on exactly once. Everything downstream sees only iterables of ExampleDict.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch

from specops.config import ConfigError, TrainConfig, TrainDataConfig
from specops.data.split import HeldOutSplit
from specops.dataset import GeneratedDataset
from specops.example import ExampleDict
from specops.stores.base import DataSink, DataSource, StoreMeta, StreamSource
from specops.train.distributed import DistEnv, all_reduce, barrier

log = logging.getLogger(__name__)
T = TypeVar("T")
StreamFactory = Callable[[], StreamSource]


@runtime_checkable
class CountingSource(Protocol):
    """A source that knows how often each token id occurs at trained positions (DiskStore does)."""

    def token_counts(self) -> dict[int, int]: ...


@runtime_checkable
class IndexedSource(Protocol):
    """A source that lists a partition's example ids without reading it (DiskStore, speculators)."""

    def ids(self, partition: str) -> list[str]: ...


def validation_partitions(
    source: DataSource, partitions: Sequence[str], split: HeldOutSplit, limit: int
) -> list[str]:
    """The partitions holding the first `limit` held-out examples (all of them, when the source
    cannot list ids): validation reads these and keeps only their held-out examples."""
    if split.fraction <= 0.0 or limit <= 0:
        return []
    if not isinstance(source, IndexedSource):
        return list(partitions)
    chosen: list[str] = []
    found = 0
    for partition in partitions:
        held = sum(1 for ex_id in source.ids(partition) if split.held_out(ex_id))
        if held:
            chosen.append(partition)
            found += held
            if found >= limit:
                break
    return chosen


class _HeldOut(Iterable[ExampleDict]):
    """The held-out examples of a dataset (re-iterable: each pass reads it again)."""

    def __init__(self, dataset: GeneratedDataset, split: HeldOutSplit) -> None:
        self.dataset, self.split = dataset, split

    def __iter__(self) -> Iterator[ExampleDict]:
        return (ex for ex in self.dataset if self.split.held_out(ex["id"]))


def count_tokens(examples: Iterable[ExampleDict]) -> dict[int, int]:
    """Token id -> occurrences at loss-masked positions."""
    counts: Counter[int] = Counter()
    for ex in examples:
        ids = ex["token_ids"][ex["loss_mask"].bool()]
        counts.update(ids.tolist())
    return dict(counts)


def open_source(
    data: TrainDataConfig, allowed_roots: Sequence[str]
) -> DataSource | StreamSource | StreamFactory:
    """The source `data.kind` names; a stream is this rank's client of the queue or broker."""
    if data.kind == "disk":
        from specops.stores.disk import DiskStore

        assert data.path is not None
        return DiskStore.open(
            data.path, allowed_roots, field="data.path", max_dropped=data.max_dropped_shards
        )
    if data.kind == "speculators":
        from specops.stores.speculators_layout import SpeculatorsSource

        assert data.path is not None
        return SpeculatorsSource(data.path, allowed_roots, field="data.path")
    if data.kind == "mpqueue":
        from specops.stores.mpqueue import MPQueueSource

        return MPQueueSource.from_config(data, allowed_roots)
    from specops.stores.zmq import ZmqSource

    return ZmqSource.from_config(data, allowed_roots)


def stream_cache(
    data: TrainDataConfig,
    source: DataSource | StreamSource | StreamFactory,
    env: DistEnv,
    allowed_roots: Sequence[str],
) -> tuple[DataSink | None, Callable[[], DataSource] | None]:
    """Stream-then-cache: this rank's DiskStore writer under data.cache_path and a reopener for replay."""
    if not data.cache_path or isinstance(source, DataSource):
        return None, None
    from specops.stores.disk import DiskStore

    meta = getattr(source, "meta", None)
    if not isinstance(meta, StoreMeta):
        raise ConfigError(
            "data.cache_path: this stream does not describe its producer (StoreMeta); cannot cache it"
        )
    path = data.cache_path
    sink = DiskStore(
        path,
        meta=meta,
        writer_index=env.rank,
        num_writers=env.world_size,
        allowed_roots=allowed_roots,
        field="data.cache_path",
    )
    return sink, lambda: DiskStore.open(
        path, allowed_roots, field="data.cache_path", max_dropped=data.max_dropped_shards
    )


def vocab_counts(
    cfg: TrainConfig, data: TrainData, vocab_size: int, allowed_roots: Sequence[str], *, resumed: bool
) -> dict[int, int]:
    """Token counts that pick the draft vocabulary: data.vocab_from, else the training data's own
    (for a stream: every rank's first window, summed over ranks).

    A resumed stream takes no window: its checkpoint carries d2t/t2d and they are loaded with the
    weights, so the counts only have to give the right sizes.
    """
    if cfg.data.vocab_from:
        from specops.stores.disk import DiskStore

        return DiskStore.open(cfg.data.vocab_from, allowed_roots, field="data.vocab_from").token_counts()
    counts = data.token_counts()
    if counts is not None:
        return counts
    if cfg.draft.draft_vocab_size >= vocab_size or resumed:
        return {}  # the draft covers the whole verifier vocabulary, or the checkpoint's is loaded
    local = data.window_counts(cfg.data.vocab_window_tokens)
    world = world_token_counts(local, vocab_size, data.env)
    log.info(
        "data: draft vocabulary (%d of %d) from the first streamed examples of %d rank(s): %d tokens",
        cfg.draft.draft_vocab_size,
        vocab_size,
        data.env.world_size,
        sum(world.values()),
    )
    return world


def world_token_counts(counts: Mapping[int, int], vocab_size: int, env: DistEnv) -> dict[int, int]:
    """Sum token counts over all ranks (dense over the verifier vocabulary), so every rank chooses
    the same draft vocabulary from the same numbers."""
    dense = torch.zeros(vocab_size, dtype=torch.long)
    if counts:
        ids = torch.tensor(list(counts), dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            bad = next(t for t in counts if not 0 <= t < vocab_size)
            raise ValueError(f"token counts: id {bad} outside the verifier vocabulary 0..{vocab_size - 1}")
        dense[ids] = torch.tensor(list(counts.values()), dtype=torch.long)
    all_reduce(dense, env)
    seen = torch.nonzero(dense).flatten()
    return dict(zip(seen.tolist(), dense[seen].tolist(), strict=True))


class TrainData:
    """Train and validation examples for this rank, split by conversation (`HeldOutSplit`).

    With a stream cache (`cache` sink + `reopen_cache`) later epochs replay the cached first pass
    through the same split, so no example changes sides.
    """

    def __init__(
        self,
        source: DataSource | StreamSource | StreamFactory,
        env: DistEnv,
        *,
        validation_fraction: float,
        seed: int,
        shuffle: bool = True,
        max_validation_examples: int = 256,
        cache: DataSink | None = None,
        reopen_cache: Callable[[], DataSource] | None = None,
    ) -> None:
        if (cache is None) != (reopen_cache is None):
            raise ValueError("a stream cache needs both the sink and reopen_cache")
        self.env = env
        self.source = source
        self.seed = seed
        self.shuffle = shuffle
        self.validation_fraction = validation_fraction
        self.split = HeldOutSplit(validation_fraction, seed)
        self.max_validation_examples = max_validation_examples
        self._cache = cache
        self._reopen_cache = reopen_cache
        self._replay: GeneratedDataset | None = None
        self._held_out: list[ExampleDict] = []
        self._train: GeneratedDataset | None = None
        self._val: _HeldOut | None = None
        self._window: deque[ExampleDict] | None = None
        self._rest: Iterator[ExampleDict] | None = None
        self._window_taken = False
        if isinstance(source, DataSource):
            self._split(source)

    @property
    def partitioned(self) -> bool:
        """Whether the source is a partitioned DataSource (its length is known before training)."""
        return self._train is not None

    @property
    def replayable(self) -> bool:
        """Whether epochs after the first can be read (partitioned sources and cached streams)."""
        return self._train is not None or self._reopen_cache is not None

    def _split(self, source: DataSource) -> None:
        partitions = list(source.partitions())
        if not partitions:
            raise ValueError("data: the source holds no partitions to train on")
        self._train = self._dataset(source, partitions, self.shuffle)
        val = validation_partitions(source, partitions, self.split, self.max_validation_examples)
        if self.validation_fraction > 0 and not val and self.max_validation_examples > 0:
            log.warning(
                "data: no conversation falls in the held-out %g; no validation", self.validation_fraction
            )
        self._val = _HeldOut(self._dataset(source, val, False), self.split) if val else None

    def _dataset(self, source: DataSource, partitions: list[str], shuffle: bool) -> GeneratedDataset:
        return GeneratedDataset(
            source,
            partitions=partitions,
            shuffle=shuffle,
            seed=self.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )

    def meta(self) -> StoreMeta | None:
        """The producer description, when the source carries one."""
        meta = getattr(self.source, "meta", None)
        return meta if isinstance(meta, StoreMeta) else None

    def token_counts(self) -> dict[int, int] | None:
        """Loss-masked token counts: the source's own, else one counting pass; None for streams."""
        if isinstance(self.source, CountingSource):
            return self.source.token_counts()
        if isinstance(self.source, DataSource):
            log.info("data: counting tokens for the draft vocabulary (one pass over the data)")
            return count_tokens(ex for p in self.source.partitions() for ex in self.source.read(p))
        return None

    def window_counts(self, max_tokens: int) -> dict[int, int]:
        """Streams: hold this rank's first training examples (until they reach `max_tokens` tokens
        or the stream ends) for epoch 0, and return their loss-masked token counts."""
        if self._train is not None or self._window_taken:
            raise ValueError("data: a token window is taken once, from a stream, before epoch 0")
        self._window_taken = True
        rest = self._stream()
        window: deque[ExampleDict] = deque()
        tokens = 0
        while tokens < max_tokens:
            example = next(rest, None)
            if example is None:
                break
            window.append(example)
            tokens += int(example["token_ids"].numel())
        self._window, self._rest = window, rest
        return count_tokens(window)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[ExampleDict]:
        """This rank's training examples of `epoch`; `skip` leaves out the first ones (resume).

        A live stream cannot be replayed, so it ignores `skip` and continues where it is.
        """
        if self._train is not None:
            self._train.set_epoch(epoch)
            return itertools.islice((ex for ex in self._train if self.split.trained(ex["id"])), skip, None)
        if epoch == 0:
            if skip:
                log.info("data: resuming a live stream; it continues where the producer is")
            if self._window is not None and self._rest is not None:
                window, rest, self._window, self._rest = self._window, self._rest, None, None
                return itertools.chain(_drain(window), rest)
            return self._stream()
        replay = self._cached()
        replay.set_epoch(epoch)
        kept = (ex for ex in replay if self.split.trained(ex["id"]))
        return itertools.islice(kept, skip, None)

    def _cached(self) -> GeneratedDataset:
        """The cache of the first pass (every rank's), opened once every rank has closed its part."""
        if self._replay is None:
            if self._reopen_cache is None:
                raise ValueError("data: a stream without data.cache_path cannot be read for a second epoch")
            self._close_cache()
            barrier(self.env)
            cache = self._reopen_cache()
            self._replay = self._dataset(cache, list(cache.partitions()), self.shuffle)
        return self._replay

    def _stream(self) -> Iterator[ExampleDict]:
        stream = (
            self.source()
            if callable(self.source) and not isinstance(self.source, StreamSource)
            else self.source
        )
        assert isinstance(stream, StreamSource)
        try:
            for ex in stream:
                if self._cache is not None:
                    self._cache.write([ex])
                if self.split.held_out(ex["id"]):
                    if len(self._held_out) < self.max_validation_examples:
                        self._held_out.append(ex)
                    continue
                yield ex
        finally:
            stream.close()

    def _close_cache(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def validation(self) -> Iterable[ExampleDict]:
        """This rank's validation examples (re-iterable)."""
        if self._val is not None:
            return self._val
        if not self._held_out and self._reopen_cache is not None and self.validation_fraction > 0:
            # Resumed after the first pass: recover the held-out examples from the cache.
            held = (ex for ex in self._cached() if self.split.held_out(ex["id"]))
            self._held_out = list(itertools.islice(held, self.max_validation_examples))
        return list(self._held_out)


def _drain(window: deque[ExampleDict]) -> Iterator[ExampleDict]:
    """Yield and let go of each held example (a window can hold gigabytes of hidden states)."""
    while window:
        yield window.popleft()


class Prefetcher(Iterator[T]):
    """Runs an iterator in a background thread, `depth` items ahead (reading and packing overlap
    the optimizer step). One producer thread, so the order is the iterator's own."""

    _DONE = object()

    def __init__(self, source: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(source,), daemon=True, name="specops-prefetch"
        )
        self._thread.start()

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # re-raised in the consumer thread
            self._error = exc
        self._queue.put(self._DONE)

    def __next__(self) -> T:
        item = self._queue.get()
        if item is self._DONE:
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the producer once its current item is done; a producer blocked inside its source
        (a stream waiting for data) is left behind as a daemon thread after `timeout_s`."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        if self._thread.is_alive():
            log.warning("data: the reader thread is still blocked in its source; leaving it behind")
