"""The upstream speculators per-sample layout: one `hs_{i}.safetensors` file per example.

vLLM's hidden-states extraction and the speculators trainer keep sample i in
`<root>/hidden_states/hs_{i}.safetensors` holding `token_ids [S]` and `hidden_states [S, L, H]`
(the last slot is the final layer output before the norm). The loss mask is not in that file: it
sits in the preprocessed Arrow dataset saved at `<root>` (columns `input_ids`, `loss_mask`,
`seq_len`, row i). This module reads such a directory as a DataSource, imports it into a DiskStore
and exports a DiskStore to it. Export also writes `loss_mask` into each hs file and a
`specops-index.json` (example ids and StoreMeta) so a round trip loses nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from specops.config import format_validation_error
from specops.example import ExampleDict
from specops.paths import resolve_allowed
from specops.stores.atomic import fsync_dir, temp_path, write_json_atomic
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore
from specops.stores.shards import Compression, ShardError, dtype_name

if TYPE_CHECKING:
    from datasets import Dataset

HS_DIR = "hidden_states"
INDEX_FILE = "specops-index.json"
HS_RE = re.compile(r"^hs_(\d+)\.safetensors$")
_TMP_PREFIX = ".tmp-export-"


class SpeculatorsIndex(BaseModel):
    """Our sidecar in an exported directory: ids[i] is the example stored in hs_{i}."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["specops-speculators-index"] = "specops-speculators-index"
    meta: StoreMeta
    ids: list[str]


def _load_index(path: Path) -> SpeculatorsIndex | None:
    if not path.is_file():
        return None
    try:
        return SpeculatorsIndex.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, str(path))) from None


def _is_arrow_dataset(root: Path) -> bool:
    return (root / "state.json").is_file() and (root / "dataset_info.json").is_file()


class SpeculatorsSource:
    """Read-only DataSource over an upstream directory; one partition per hs file.

    `meta` describes the producer; without it the exported index's is used, and without either
    shapes are still checked for consistency but not against a verifier.
    """

    def __init__(
        self,
        path: str | Path,
        allowed_roots: Sequence[str | Path] = (),
        *,
        meta: StoreMeta | None = None,
        field: str = "data.path",
    ) -> None:
        self.root = resolve_allowed(path, allowed_roots, field)
        self.hs_dir = self.root / HS_DIR if (self.root / HS_DIR).is_dir() else self.root
        try:
            names = os.listdir(self.hs_dir)
        except FileNotFoundError:
            raise FileNotFoundError(f"{field}: {self.root} does not exist") from None
        found = {int(m.group(1)): n for n in names if (m := HS_RE.match(n))}
        if not found:
            raise FileNotFoundError(f"{field}: {self.hs_dir} holds no hs_{{i}}.safetensors files")
        self._files = dict(sorted(found.items()))
        index = _load_index(self.root / INDEX_FILE)
        self.meta = meta or (index.meta if index else None)
        self._ids = index.ids if index else None
        self._masks: Dataset | None = None

    def partitions(self) -> list[str]:
        return [f"hs_{i}" for i in self._files]

    def example_id(self, partition: str) -> str:
        """The id of the example in `partition`: from the index, else `speculators/<i>/0`."""
        i = self._index_of(partition)
        if self._ids is not None and i < len(self._ids):
            return self._ids[i]
        return f"speculators/{i}/0"

    def ids(self, partition: str) -> list[str]:
        """The one example id of `partition` (an hs file holds one example)."""
        return [self.example_id(partition)]

    def read(self, partition: str) -> Iterator[ExampleDict]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        i = self._index_of(partition)
        path = self.hs_dir / self._files[i]
        try:
            data = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ShardError(f"{path}: unreadable: {exc}") from None
        yield self._to_example(path, i, data)

    def _index_of(self, partition: str) -> int:
        match = re.fullmatch(r"hs_(\d+)", partition)
        if not match or int(match.group(1)) not in self._files:
            raise KeyError(f"{self.hs_dir}: no partition {partition!r}")
        return int(match.group(1))

    def _to_example(self, path: Path, i: int, data: dict[str, torch.Tensor]) -> ExampleDict:
        missing = {"token_ids", "hidden_states"} - data.keys()
        if missing:
            raise ShardError(f"{path}: missing {sorted(missing)}")
        tokens, hidden = data["token_ids"], data["hidden_states"]
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ShardError(
                f"{path}: token_ids must be an integer [S] tensor, got {dtype_name(tokens.dtype)} {list(tokens.shape)}"
            )
        seq = tokens.shape[0]
        if hidden.dim() != 3 or hidden.shape[0] != seq:
            raise ShardError(f"{path}: hidden_states must be [S={seq}, L, H], got {list(hidden.shape)}")
        if self.meta is not None:
            want = [seq, len(self.meta.layer_ids), self.meta.hidden_size]
            if list(hidden.shape) != want or dtype_name(hidden.dtype) != self.meta.dtype:
                raise ShardError(
                    f"{path}: hidden_states is {dtype_name(hidden.dtype)} {list(hidden.shape)}, "
                    f"the verifier meta says {self.meta.dtype} {want}"
                )
        if seq and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**31):
            raise ShardError(f"{path}: token_ids outside the int32 range")
        mask = data.get("loss_mask")
        if mask is None:
            mask = self._arrow_mask(path, i, seq)
        if mask.dim() != 1 or mask.shape[0] != seq:
            raise ShardError(f"{path}: loss_mask must be [S={seq}], got {list(mask.shape)}")
        return {
            "id": self.example_id(f"hs_{i}"),
            "token_ids": tokens.to(torch.int32),
            "loss_mask": mask.to(torch.uint8),
            "hidden_states": hidden,
        }

    def _arrow_mask(self, path: Path, i: int, seq: int) -> torch.Tensor:
        """Row i's loss mask from the preprocessed Arrow dataset, or all ones when there is none."""
        if not _is_arrow_dataset(self.root):
            return torch.ones(seq, dtype=torch.uint8)
        if self._masks is None:
            from datasets import load_from_disk

            self._masks = load_from_disk(str(self.root)).select_columns(["loss_mask"]).with_format(None)
        if i >= len(self._masks):
            raise ShardError(f"{path}: the Arrow dataset at {self.root} has no row {i} for its loss_mask")
        return torch.tensor(self._masks[i]["loss_mask"], dtype=torch.uint8)


def import_speculators(
    src: str | Path,
    dest: str | Path,
    *,
    meta: StoreMeta | None = None,
    allowed_roots: Sequence[str | Path] = (),
    shard_size: int = 64,
    compression: Compression = "none",
) -> int:
    """Copy an upstream directory into a DiskStore at `dest` (resumable); returns examples stored."""
    source = SpeculatorsSource(src, allowed_roots, meta=meta, field="import source")
    if source.meta is None:
        raise ValueError(
            f"{source.root}: no {INDEX_FILE} to say which verifier and layers produced it; pass meta"
        )
    with DiskStore(
        dest, meta=source.meta, shard_size=shard_size, compression=compression, allowed_roots=allowed_roots
    ) as store:
        done = store.done_ids()
        for partition in source.partitions():
            if source.example_id(partition) not in done:
                store.write(list(source.read(partition)))
    return len(store)


def export_speculators(
    store: DiskStore, dest: str | Path, *, allowed_roots: Sequence[str | Path] = (), arrow: bool = True
) -> int:
    """Write every example of `store` as `dest/hidden_states/hs_{i}.safetensors` (plus the Arrow
    dataset with `input_ids`/`loss_mask`/`seq_len` when `arrow`); returns the example count."""
    from safetensors.torch import save_file

    root = resolve_allowed(dest, allowed_roots, "export path")
    hs_dir = root / HS_DIR
    hs_dir.mkdir(parents=True, exist_ok=True)
    if any(HS_RE.match(name) for name in os.listdir(hs_dir)):
        raise FileExistsError(
            f"export path: {hs_dir} already holds hs_{{i}}.safetensors files; pick an empty directory"
        )
    ids: list[str] = []
    rows: dict[str, list[Any]] = {"input_ids": [], "loss_mask": [], "seq_len": []}
    for partition in store.partitions():
        for ex in store.read(partition):
            final = hs_dir / f"hs_{len(ids)}.safetensors"
            tmp = temp_path(final, _TMP_PREFIX)
            tensors = {
                "token_ids": ex["token_ids"].to(torch.int64),
                "hidden_states": ex["hidden_states"].contiguous(),
                "loss_mask": ex["loss_mask"].contiguous(),
            }
            try:
                save_file(tensors, tmp)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            ids.append(ex["id"])
            rows["input_ids"].append(ex["token_ids"].tolist())
            rows["loss_mask"].append(ex["loss_mask"].tolist())
            rows["seq_len"].append(int(ex["token_ids"].shape[0]))
    fsync_dir(hs_dir)
    if arrow:
        from datasets import Dataset

        Dataset.from_dict(rows).with_format("torch").save_to_disk(str(root))
    index = SpeculatorsIndex(meta=store.meta, ids=ids)
    write_json_atomic(root / INDEX_FILE, index.model_dump(mode="json"), _TMP_PREFIX)
    return len(ids)
