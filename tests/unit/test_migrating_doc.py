"""The configs in docs/migrating.md are valid SpecOps configs (a doc that fails to load misleads)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from specops.config import DataGenConfig, TrainConfig, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
BLOCKS = re.findall(r"```yaml\n# (datagen|train)\.yaml\n(.*?)```", DOC.read_text(), re.S)


def test_each_worked_example_has_both_configs() -> None:
    assert [kind for kind, _ in BLOCKS] == ["datagen", "train", "datagen", "train"]


@pytest.mark.parametrize(("kind", "text"), BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_the_config_loads(kind: str, text: str) -> None:
    model = DataGenConfig if kind == "datagen" else TrainConfig
    config = load_config(model, yaml.safe_load(text))
    if isinstance(config, DataGenConfig):
        assert config.datasets[0].preset == "sharegpt"
