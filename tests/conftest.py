"""Shared pytest fixtures: the tiny verifier (built once, cached) and synthetic conversations."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_verifier_dir() -> Path:
    """A trained tiny Llama verifier directory with a Llama-3 style chat template."""
    from specops.testing.tiny import tiny_verifier

    return tiny_verifier()


@pytest.fixture(scope="session")
def synthetic_rows() -> list[dict]:
    from specops.testing.synthetic import make_conversations

    return make_conversations(48, seed=7)


@pytest.fixture()
def synthetic_jsonl(tmp_path: Path, synthetic_rows: list[dict]) -> Path:
    from specops.testing.synthetic import write_jsonl

    return write_jsonl(tmp_path / "conversations.jsonl", synthetic_rows)
