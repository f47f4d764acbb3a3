"""Dataset sources: Hugging Face ids, local json/jsonl/parquet/arrow data, plain text files.

Every usable row becomes a `Conversation` with normalized roles (system, user, assistant, tool)
and the id `<name>/<row>/<turn>`: `name` is the source's `name` (default: the file or dataset name),
`row` the row number in the source (or the value of `columns.id`), `turn` is 0 because one
conversation is one example. Ids depend only on the source, so a rerun or a resumed run reproduces
them. Malformed rows are skipped and counted in one warning per source; a source that cannot be
opened at all is a `SourceError` naming `datasets[i]`.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from specops.config import ConfigError, DatasetSource
from specops.data.records import Conversation, Message
from specops.paths import PathNotAllowedError, resolve_allowed

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
"""Turn-list columns tried, in order, when `columns.messages` is unset."""
TEXT_SUFFIXES = (".txt", ".md")
"""Files a `kind: text` directory contributes."""
READ_CHUNK = 1 << 20
"""Characters read at a time by the streaming JSON array reader."""


class SourceError(ConfigError):
    """A dataset cannot be read; the message names the config field and the file."""


class MalformedRow(ValueError):
    """One row cannot be normalized; it is skipped and counted, never fatal."""


def source_name(source: DatasetSource, position: int) -> str:
    """The id prefix: `source.name`, else the file or dataset name made id-safe."""
    if source.name:
        return source.name
    stem = Path(source.path.removeprefix("package:").rstrip("/")).name.split(".")[0]
    return _safe(stem) or f"dataset{position}"


def _safe(value: object) -> str:
    """An id component: no `/` (the id separator), no spaces or control characters."""
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", str(value)).strip("-")


def iter_conversations(
    source: DatasetSource, position: int, allowed_roots: Sequence[str] = ()
) -> Iterator[Conversation]:
    """Normalized conversations of one source, in a stable order, at most `max_samples`."""
    field = f"datasets[{position}]"
    name = source_name(source, position)
    skipped, first_problem = 0, ""
    seen: set[str] = set()
    yielded = 0
    for number, row in enumerate(_rows(source, field, allowed_roots)):
        if source.max_samples is not None and yielded >= source.max_samples:
            break
        try:
            conversation = normalize_row(row, number, name, source)
            if conversation.id in seen:
                raise MalformedRow(f"duplicate id {conversation.id!r}")
        except MalformedRow as exc:
            skipped += 1
            first_problem = first_problem or f"row {number}: {exc}"
            continue
        if source.columns.id or source.kind == "text":
            seen.add(conversation.id)
        yielded += 1
        yield conversation
    if skipped:
        log.warning(
            "%s (%s): skipped %d malformed rows (first: %s)", field, source.path, skipped, first_problem
        )


def _rows(source: DatasetSource, field: str, allowed_roots: Sequence[str]) -> Iterable[Any]:
    """Raw rows (dicts; `None` for a line that is not JSON) in source order."""
    if source.kind == "hf":
        return _hf_rows(source, field, allowed_roots)
    path = resolve_allowed(source.path, allowed_roots, f"{field}.path")
    if not path.exists():
        raise SourceError(f"{field}.path: {path} does not exist")
    if source.kind == "text":
        return _text_rows(path, field)
    if path.is_dir():
        return _arrow_dir_rows(path, source, field)
    compressed = path.suffix == ".gz"
    suffix = Path(path.stem).suffix if compressed else path.suffix
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return iter_json_array(path, f"{field}.path")
    if suffix == ".parquet" and not compressed:
        return _parquet_rows(path, field)
    raise SourceError(
        f"{field}.path: {path}: unsupported file type (json, jsonl, optionally .gz; parquet; a "
        "directory written by Dataset.save_to_disk; kind: text for .txt files)"
    )


def looks_local(path: str) -> bool:
    """An hf `path` that names a local directory rather than a Hub id."""
    return path.startswith(("/", "./", "../", "~", "package:")) or Path(path).expanduser().exists()


def _hf_rows(source: DatasetSource, field: str, allowed_roots: Sequence[str]) -> Iterable[Any]:
    """`datasets.load_dataset(id, subset, split=...)`.

    Without network the Hub id is served from the local datasets cache (set `HF_HUB_OFFLINE=1` to
    skip the connection retries). A local dataset directory is allowed too, under the roots.
    """
    import datasets

    target = source.path
    if looks_local(target):
        target = str(resolve_allowed(target, allowed_roots, f"{field}.path"))
    try:
        return datasets.load_dataset(target, source.subset, split=source.split)
    except Exception as exc:  # datasets raises many types; the user needs the field and the cause
        raise SourceError(f"{field}.path: cannot load Hugging Face dataset {source.path!r}: {exc}") from None


def _arrow_dir_rows(path: Path, source: DatasetSource, field: str) -> Iterable[Any]:
    """A directory written by `save_to_disk`: a Dataset, or a DatasetDict (then `split` picks)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SourceError(f"{field}.path: {path} is not a saved Hugging Face dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise SourceError(f"{field}.split: {source.split!r} is not in {path} (has {sorted(loaded)})")
        return loaded[source.split]
    return loaded


def _parquet_rows(path: Path, field: str) -> Iterator[Any]:
    """Rows batch by batch with pyarrow: bounded memory, no cache written."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise SourceError(f"{field}.path: {path} is not a readable parquet file: {exc}") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


def _jsonl_rows(path: Path) -> Iterator[Any]:
    """One row per non-blank line; a line that is not JSON becomes `None` (a malformed row)."""
    with _open_text(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def iter_json_array(path: Path, field: str) -> Iterator[Any]:
    """Elements of a top-level JSON array (or one top-level value), read in chunks.

    A truncated or broken tail ends the array with a warning instead of failing the whole file as
    `json.load` would (the ShareGPT V3 file on PyPI is cut off mid-element): every complete
    element before the damage is yielded. Memory stays at one chunk plus the largest element.
    """
    decoder = json.JSONDecoder()
    with _open_text(path) as handle:
        buffer, position, eof = "", 0, False

        def more(minimum: int = READ_CHUNK) -> None:
            nonlocal buffer, position, eof
            chunk = handle.read(max(minimum, READ_CHUNK))
            eof = not chunk
            buffer, position = buffer[position:] + chunk, 0

        def skip_space() -> str:
            """Peek at the next non-space character; '' at the end of the file."""
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    position += 1
                if position < len(buffer) or eof:
                    return buffer[position] if position < len(buffer) else ""
                more()

        first = skip_space()
        if first != "[":
            rest = buffer[position:] + handle.read()
            if rest.strip():
                try:
                    yield json.loads(rest)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{field}: {path} is not valid JSON: {exc}") from None
            return
        position += 1
        count, separator = 0, ","
        while skip_space() != "]":
            try:
                element, end = decoder.raw_decode(buffer, position)
                # A number ending where the text ends may be cut short; anything else closes itself.
                complete = end < len(buffer) or (eof and type(element) not in (int, float))
            except json.JSONDecodeError:
                complete = False
            if not complete and not eof:
                more(len(buffer) - position)  # grows geometrically for very large elements
                continue
            if not complete or separator != ",":
                log.warning(
                    "%s: %s is truncated or invalid after %d complete elements; the rest is ignored",
                    field, path, count,
                )  # fmt: skip
                return
            count += 1
            yield element
            position = end
            separator = skip_space()
            if separator == ",":
                position += 1


def _text_rows(path: Path, field: str) -> Iterator[Any]:
    """One example per text file, in path order; the id is the path below `path`, sans suffix."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise SourceError(f"{field}.path: {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        files = [path]
    for file in files:
        target = file.resolve()
        if path.is_dir() and not target.is_relative_to(path):
            # `path` passed the allowed-roots check; a link inside it must not lead elsewhere.
            raise PathNotAllowedError(f"{field}.path: {file} links to {target}, outside {path}")
        relative = file.relative_to(path).with_suffix("") if path.is_dir() else Path(file.stem)
        yield {"text": file.read_text(encoding="utf-8", errors="replace"), "id": relative.as_posix()}


def normalize_row(row: Any, number: int, name: str, source: DatasetSource) -> Conversation:
    """One row -> Conversation; `MalformedRow` says why it is unusable."""
    if not isinstance(row, dict):
        raise MalformedRow("not a JSON object" if row is None else f"a {type(row).__name__}, not an object")
    cols = source.columns
    id_key = cols.id or ("id" if source.kind == "text" else None)
    row_id = row.get(id_key) if id_key else number
    if row_id is None or not _safe(row_id):
        raise MalformedRow(f"no usable id in column {id_key!r}")
    conversation_id = f"{name}/{_safe(row_id)}/0"
    if source.kind == "text" or source.format == "text" or cols.text:
        return Conversation(id=conversation_id, text=_text(row, cols.text or "text"))
    column = cols.messages or next((c for c in MESSAGE_COLUMNS if c in row), None)
    turns = row.get(column) if column else None
    if column is None and source.format == "auto" and "text" in row:
        return Conversation(id=conversation_id, text=_text(row, "text"))
    if not isinstance(turns, list) or not turns:
        raise MalformedRow(f"no turn list in column {column or '/'.join(MESSAGE_COLUMNS)!r}")
    messages = tuple(_message(turn, index, source) for index, turn in enumerate(turns))
    if not any(m.role == "assistant" for m in messages):
        raise MalformedRow("no assistant turn")
    return Conversation(id=conversation_id, messages=messages)


def _text(row: dict[str, Any], column: str) -> str:
    text = row.get(column)
    if not isinstance(text, str) or not text.strip():
        raise MalformedRow(f"no text in column {column!r}")
    return text


def _message(turn: Any, index: int, source: DatasetSource) -> Message:
    """One turn; OpenAI content given as a list of parts keeps its text parts."""
    if not isinstance(turn, dict):
        raise MalformedRow(f"turn {index} is not an object")
    cols, fmt = source.columns, source.format
    role_key = cols.role_key or {"sharegpt": "from", "openai": "role"}.get(fmt)
    content_key = cols.content_key or {"sharegpt": "value", "openai": "content"}.get(fmt)
    role = turn.get(role_key) if role_key else turn.get("role", turn.get("from"))
    content = turn.get(content_key) if content_key else turn.get("content", turn.get("value"))
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(p for p in parts if isinstance(p, str)) if parts else None
    normalized = ROLE_ALIASES.get(str(role).lower())
    if normalized is None:
        raise MalformedRow(f"turn {index} has unknown role {role!r}")
    if not isinstance(content, str):
        raise MalformedRow(f"turn {index} has no text content")
    return Message(role=normalized, content=content)
