"""Dataset sources: Hugging Face ids, local json/jsonl/parquet/arrow files, plain text files.

Every row becomes a `Conversation` with OpenAI-style roles and a stable id `<name>/<row>/<turn>`
(`turn` is 0: one example per conversation; the slot is kept for splitting long conversations).
Malformed rows are skipped and counted, never fatal; a file that cannot be read at all is an error
naming `datasets[i].path`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from specops.config import DatasetSource
from specops.data.records import Conversation, Message
from specops.paths import resolve_allowed

log = logging.getLogger(__name__)

ROLE_ALIASES: dict[str, str] = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}  # fmt: skip
"""ShareGPT and OpenAI speaker names -> normalized roles."""

MESSAGE_COLUMNS = ("messages", "conversations", "conversation")
TEXT_SUFFIXES = (".txt", ".md")


class SourceError(ValueError):
    """A dataset cannot be read; the message names the config field and the file."""


def source_name(source: DatasetSource, position: int) -> str:
    """The id prefix: `source.name`, else the file/dataset name made id-safe."""
    if source.name:
        return source.name
    stem = Path(source.path.rstrip("/")).name.split(".")[0] or f"dataset{position}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def iter_conversations(
    source: DatasetSource, position: int, allowed_roots: Sequence[str] = ()
) -> Iterator[Conversation]:
    """Normalized conversations of one source, in a stable order, at most `max_samples`."""
    field = f"datasets[{position}].path"
    name = source_name(source, position)
    rows = _rows(source, field, allowed_roots)
    skipped = yielded = 0
    for number, row in enumerate(rows):
        if source.max_samples is not None and yielded >= source.max_samples:
            break
        conversation = normalize_row(row, number, name, source)
        if conversation is None:
            skipped += 1
            continue
        yielded += 1
        yield conversation
    if skipped:
        log.warning("%s (%s): skipped %d malformed rows", field, source.path, skipped)


def _rows(source: DatasetSource, field: str, allowed_roots: Sequence[str]) -> Iterable[Any]:
    if source.kind == "hf":
        return _hf_rows(source, field)
    path = resolve_allowed(source.path, allowed_roots, field)
    if not path.exists():
        raise SourceError(f"{field}: {path} does not exist")
    if source.kind == "text":
        return _text_rows(path, field)
    if path.is_dir():
        return _arrow_dir_rows(path, source, field)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix == ".jsonl":
        return _jsonl_rows(path, field)
    if suffix == ".json":
        return iter_json_array(path, field)
    if suffix == ".parquet":
        return _parquet_rows(path, source, field)
    raise SourceError(f"{field}: {path}: unsupported file type {suffix!r} (json, jsonl, parquet, arrow dir)")


def _hf_rows(source: DatasetSource, field: str) -> Iterable[Any]:
    """`datasets.load_dataset(id)`: served from the local cache when the Hub is unreachable."""
    import datasets

    try:
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as exc:  # datasets raises many types; the user needs the field and the cause
        raise SourceError(f"{field}: cannot load Hugging Face dataset {source.path!r}: {exc}") from None


def _arrow_dir_rows(path: Path, source: DatasetSource, field: str) -> Iterable[Any]:
    """A directory written by `Dataset.save_to_disk` (or a DatasetDict: the split is picked)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SourceError(f"{field}: {path} is not a saved Hugging Face dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise SourceError(f"datasets: split {source.split!r} not in {path} (has {sorted(loaded)})")
        return loaded[source.split]
    return loaded


def _parquet_rows(path: Path, source: DatasetSource, field: str) -> Iterable[Any]:
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:
        raise SourceError(f"{field}: {path} is not a readable parquet file: {exc}") from None


def _jsonl_rows(path: Path, field: str) -> Iterator[Any]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: %s line %d is not valid JSON; skipped", field, path, number + 1)
                yield None


def iter_json_array(path: Path, field: str) -> Iterator[Any]:
    """Elements of a top-level JSON array (or the single object), tolerating a truncated tail.

    The ShareGPT V3 file on PyPI is cut off mid-element: every complete element before the cut is
    yielded and the rest reported, instead of failing the whole file as `json.load` would.
    """
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    if start >= len(text):
        return
    if text[start] != "[":
        try:
            yield decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError as exc:
            raise SourceError(f"{field}: {path} is not valid JSON: {exc}") from None
        return
    index = _skip_ws(text, start + 1)
    count = 0
    while index < len(text) and text[index] != "]":
        try:
            element, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            log.warning(
                "%s: %s is truncated after %d complete elements; the rest is ignored", field, path, count
            )
            return
        count += 1
        yield element
        index = _skip_ws(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_ws(text, index + 1)


def _skip_ws(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _text_rows(path: Path, field: str) -> Iterator[Any]:
    """One example per text file, in name order."""
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise SourceError(f"{field}: {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    for file in files:
        yield {"text": file.read_text(encoding="utf-8", errors="replace"), "id": file.stem}


def normalize_row(row: Any, number: int, name: str, source: DatasetSource) -> Conversation | None:
    """One row -> Conversation, or None when it has no usable turns."""
    if not isinstance(row, dict):
        return None
    cols = source.columns
    id_key = cols.id or ("id" if source.kind == "text" else None)  # text files are named by file
    row_id = row.get(id_key) if id_key else None
    conversation_id = f"{name}/{row_id if row_id is not None else number}/0"
    if source.format == "text" or source.kind == "text" or cols.text:
        text = row.get(cols.text or "text")
        return Conversation(id=conversation_id, text=text) if isinstance(text, str) and text else None
    column = cols.messages or next((c for c in MESSAGE_COLUMNS if c in row), None)
    turns = row.get(column) if column else None
    if not isinstance(turns, list) or not turns:
        text = row.get("text") if source.format == "auto" else None
        return Conversation(id=conversation_id, text=text) if isinstance(text, str) and text else None
    messages = [m for m in (_message(t, source) for t in turns) if m is not None]
    if len(messages) != len(turns) or not any(m.role == "assistant" for m in messages):
        return None
    return Conversation(id=conversation_id, messages=tuple(messages))


def _message(turn: Any, source: DatasetSource) -> Message | None:
    if not isinstance(turn, dict):
        return None
    cols, fmt = source.columns, source.format
    role_key = cols.role_key or ("from" if fmt == "sharegpt" else "role" if fmt == "openai" else None)
    content_key = cols.content_key or (
        "value" if fmt == "sharegpt" else "content" if fmt == "openai" else None
    )
    role = turn.get(role_key) if role_key else turn.get("role", turn.get("from"))
    content = turn.get(content_key) if content_key else turn.get("content", turn.get("value"))
    normalized = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
    if normalized is None or not isinstance(content, str):
        return None
    return Message(role=normalized, content=content)
