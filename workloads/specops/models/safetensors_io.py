"""Read selected tensors from a model directory's safetensors files without loading the rest.

Handles a single `model.safetensors` and sharded checkpoints with `model.safetensors.index.json`;
a Hub id is resolved through the local Hugging Face cache only (no downloads at run time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def model_file(name_or_path: str | Path, filename: str) -> Path | None:
    """`filename` inside a local directory, or from the offline Hub cache; None when absent."""
    local = Path(name_or_path)
    if local.is_dir():
        candidate = local / filename
        return candidate if candidate.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    found = try_to_load_from_cache(str(name_or_path), filename)
    return Path(found) if isinstance(found, str) else None


def read_json(name_or_path: str | Path, filename: str) -> dict[str, Any]:
    """A JSON file of the model (config.json, the shard index)."""
    path = model_file(name_or_path, filename)
    if path is None:
        raise FileNotFoundError(f"{name_or_path}: no {filename}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object")
    return data


def weight_locations(name_or_path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_file(name_or_path, INDEX_FILE)
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: index.parent / shard for name, shard in weight_map.items()}
    single = model_file(name_or_path, SINGLE_FILE)
    if single is None:
        raise FileNotFoundError(
            f"{name_or_path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
        )
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def read_tensors(name_or_path: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Exactly the requested tensors (CPU, stored dtype); a missing name is an error naming the file."""
    wanted = list(names)
    locations = weight_locations(name_or_path)
    missing = [n for n in wanted if n not in locations]
    if missing:
        raise KeyError(f"{name_or_path}: tensors {missing} not found in its safetensors checkpoint")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(locations[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in file_names:
                out[name] = handle.get_tensor(name)
    return out
