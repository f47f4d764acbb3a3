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
    """48 synthetic conversations (seed 7), OpenAI shape."""
    from specops.testing.synthetic import make_conversations

    return make_conversations(48, seed=7)


@pytest.fixture(scope="session")
def synthetic_jsonl(tmp_path_factory: pytest.TempPathFactory, synthetic_rows: list[dict]) -> Path:
    """48 synthetic OpenAI-shape conversations as jsonl (shared: treat as read-only)."""
    from specops.testing.synthetic import write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("synthetic") / "conversations.jsonl", synthetic_rows)
