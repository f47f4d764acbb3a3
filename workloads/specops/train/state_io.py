"""Nested training state (optimizer, RNG) as safetensors + JSON: no pickle, readable, exact.

`save_tree` replaces every tensor in a nested dict/list/tuple structure by a reference into one
safetensors file and writes the rest as JSON; `load_tree` rebuilds the identical structure.
Tuples and non-string dict keys survive the trip (they matter to `Optimizer.load_state_dict`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specops.exitcodes import DataError
from specops.stores.atomic import fsync_file

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class StateFormatError(DataError):
    """A state file is missing, unreadable or does not match its JSON skeleton; names the file."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in (_TENSOR, _TUPLE, _ITEMS) for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"cannot store {type(value).__name__} at {path or '<root>'} (tensors and JSON values only)"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        if key not in tensors:
            raise StateFormatError(
                f"{source}: tensor {key!r} listed in the JSON is not in the safetensors file"
            )
        return tensors[key]
    if _TUPLE in value:
        return tuple(_decode(v, tensors, source) for v in value[_TUPLE])
    if _ITEMS in value:
        return {k: _decode(v, tensors, source) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors, source) for k, v in value.items()}


def save_tree(directory: Path, name: str, tree: Any) -> None:
    """Write `name.safetensors` and `name.json` in `directory` (each via a temp file and rename)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, "", tensors)
    directory.mkdir(parents=True, exist_ok=True)
    st_tmp = directory / f".{name}.safetensors.tmp"
    save_file(tensors, str(st_tmp), metadata={"format": "specops-state"})
    fsync_file(st_tmp)  # each rank makes its own files durable (ranks may sit on other nodes)
    os.replace(st_tmp, directory / f"{name}.safetensors")
    write_json(directory / f"{name}.json", skeleton)


def load_tree(directory: Path, name: str) -> Any:
    """The structure `save_tree(directory, name, ...)` wrote."""
    st_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    skeleton = read_json(json_path)
    try:
        tensors = load_file(str(st_path))
    except FileNotFoundError:
        raise StateFormatError(f"{st_path}: missing") from None
    except SafetensorError as exc:
        raise StateFormatError(f"{st_path}: unreadable: {exc}") from None
    return _decode(skeleton, tensors, st_path)


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON written to a temp file, fsynced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    fsync_file(tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateFormatError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise StateFormatError(f"{path}: not valid JSON: {exc}") from None
