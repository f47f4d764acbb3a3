"""Seed the Hugging Face `datasets` cache with rows for a Hub id, as if downloaded earlier.

With `HF_HUB_OFFLINE` set, `datasets.load_dataset(repo_id, subset, split=...)` then serves these
rows from the cache: the real library code path, no network. The arrow files are built by the
`json` builder and moved where the cache lookup lists them (`<namespace>___<snake_name>/<config>/`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def seed_dataset_cache(
    cache: Path, repo_id: str, rows: Sequence[dict[str, Any]], split: str = "train", config: str = "default"
) -> Path:
    """Write `rows` as split `split` of `repo_id` (configuration `config`) into cache `cache`."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    namespace, _, name = repo_id.rpartition("/")
    snake = camelcase_to_snakecase(name)
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "rows.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        built = datasets.load_dataset(
            "json", data_files={split: str(source)}, split=split, cache_dir=str(Path(scratch) / "build")
        )
        arrow_dir = Path(built.cache_files[0]["filename"]).parent
        target = cache / f"{namespace}___{snake}" / config / "0.0.0" / arrow_dir.name
        target.parent.mkdir(parents=True, exist_ok=True)
        arrow_dir.rename(target)
    for arrow in target.glob("json-*"):
        arrow.rename(target / arrow.name.replace("json-", f"{snake}-", 1))
    info = target / "dataset_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "config_name": config}))
    return target
