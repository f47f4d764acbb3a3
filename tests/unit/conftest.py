"""Fixtures of the model tests: the tiny Llama verifier of `_models_support`, built once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from _models_support import build_verifier
from transformers import LlamaForCausalLM


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 4-layer verifier; a module overrides this fixture for another shape."""
    path = tmp_path_factory.mktemp("verifier")
    build_verifier(path)
    return path


@pytest.fixture(scope="module")
def verifier(verifier_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(verifier_dir).eval()
