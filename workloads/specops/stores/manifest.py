"""Manifests: the commit markers of a DiskStore directory, and the file names around them.

Each writer owns `manifest-wNNNNN.json` (its shards, their ids and checksums) and
`tokens-wNNNNN.json` (a cache of its loss-token counts). A shard exists for readers only once a
manifest lists it. `manifest.json` + `tokens.json` are the merged summary written when every
writer has finished.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specops.config import format_validation_error
from specops.exitcodes import DataError
from specops.stores.atomic import write_bytes_atomic
from specops.stores.base import StoreMeta
from specops.stores.digests import DIGEST_PATTERN
from specops.stores.shards import Compression

MERGED_MANIFEST = "manifest.json"
MERGED_TOKENS = "tokens.json"
WRITER_MANIFEST_RE = re.compile(r"^manifest-w(\d{5,})\.json$")
SHARD_RE = re.compile(r"^shard-w(\d{5,})-(\d{5,})\.safetensors(\.zst)?$")
M = TypeVar("M", bound=BaseModel)


class ManifestError(DataError):
    """A manifest or token-count file is unreadable or malformed; the message names the file."""


class StoreMetaMismatchError(DataError):
    """The directory holds examples from a different producer than this run."""


def writer_tag(index: int) -> str:
    return f"w{index:05d}"


def manifest_name(writer: int) -> str:
    return f"manifest-{writer_tag(writer)}.json"


def tokens_name(manifest: str) -> str:
    """The token-count cache that belongs to a manifest file name."""
    return manifest.replace("manifest", "tokens", 1)


def shard_name(writer: int, seq: int, compression: Compression) -> str:
    return f"shard-{writer_tag(writer)}-{seq:05d}.safetensors" + (".zst" if compression == "zstd" else "")


def shard_sort_key(file: str) -> tuple[int, int]:
    """(writer, sequence) of a shard file name: the canonical partition order."""
    match = SHARD_RE.match(file)
    if not match:
        raise ValueError(f"not a shard file name: {file}")
    return int(match.group(1)), int(match.group(2))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Strict):
    """One committed shard."""

    file: Annotated[str, Field(pattern=SHARD_RE.pattern)]
    digest: Annotated[str, Field(pattern=DIGEST_PATTERN)]
    """`xxh3-128:<32 hex>` or `sha256:<64 hex>` of the file as stored (compressed bytes when
    compressed); checks use the algorithm recorded here, so one store may mix both."""
    nbytes: Annotated[int, Field(ge=8)]
    """Size on disk."""
    raw_nbytes: Annotated[int, Field(ge=8)]
    """Size of the safetensors payload (equals nbytes when uncompressed)."""
    compression: Compression
    num_tokens: Annotated[int, Field(ge=0)]
    fields: tuple[str, ...]
    """Per-token tensors present, e.g. token_ids, loss_mask, hidden_states."""
    ids: tuple[str, ...]
    """Example ids in file order."""


class Manifest(BaseModel):
    """A writer's commit marker (or the merged summary when `writer` is None)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["specops-manifest"] = "specops-manifest"
    version: Literal[2] = 2
    """2: shard `digest` strings; version 1 (a bare `sha256` per shard) is read as sha256 digests."""
    writer: Annotated[int, Field(ge=0)] | None = None
    num_writers: Annotated[int, Field(ge=1)] | None = None
    complete: bool = False
    """Set by finalize(): this writer's input slice is fully written."""
    meta: StoreMeta
    shards: list[ShardEntry] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, data: Any) -> Any:
        """Version 1 differs only in `sha256: <hex>` where version 2 has `digest: sha256:<hex>`."""
        if not isinstance(data, dict) or data.get("version") != 1:
            return data
        shards = data.get("shards", [])
        if isinstance(shards, list):
            shards = [_v1_shard(s) for s in shards]
        return {**data, "version": 2, "shards": shards}


def _v1_shard(entry: Any) -> Any:
    """A version-1 shard entry as version 2 (anything else is left for validation to reject)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return entry
    return {k: v for k, v in entry.items() if k != "sha256"} | {"digest": f"sha256:{entry['sha256']}"}


class TokenCounts(_Strict):
    """Cache of summed loss-token counts over exactly the shards listed (file -> digest)."""

    format: Literal["specops-tokens"] = "specops-tokens"
    shards: dict[str, str]
    counts: dict[int, int]

    @field_validator("shards", mode="before")
    @classmethod
    def _upgrade_v1(cls, shards: Any) -> Any:
        """Caches written beside version-1 manifests hold bare sha256 hex."""
        if not isinstance(shards, dict):
            return shards
        return {f: d if not isinstance(d, str) or ":" in d else f"sha256:{d}" for f, d in shards.items()}


def load_manifest(path: Path) -> Manifest:
    return _load(Manifest, path)


def load_token_counts(path: Path) -> TokenCounts | None:
    """The cache at `path`, or None when absent or unreadable (it is only a cache)."""
    try:
        return _load(TokenCounts, path)
    except (ManifestError, FileNotFoundError):
        return None


def _load(model: type[M], path: Path) -> M:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, str(path))) from None


def save(path: Path, model: BaseModel, temp_prefix: str, *, durable: bool = True) -> None:
    """Atomically replace `path` with `model` as compact JSON (`durable=False`: no fsync, for caches).

    pydantic's own serializer: a token cache of 50k ids encodes ~5x faster than through `json`.
    """
    write_bytes_atomic(path, model.model_dump_json().encode(), temp_prefix, durable=durable)


def check_meta(found: StoreMeta, expected: StoreMeta, source: Path) -> None:
    """Refuse to mix producers: name every differing StoreMeta field and the file that disagrees."""
    if found == expected:
        return
    have, want = asdict(found), asdict(expected)
    diffs = "; ".join(f"{k}: stored {have[k]!r}, this run {want[k]!r}" for k in have if have[k] != want[k])
    raise StoreMetaMismatchError(
        f"{source}: examples here come from a different producer ({diffs}); use a new sync.path "
        "or the original verifier and layers"
    )
