"""Synthetic multi-turn conversations with structure a small model (and a draft) can learn."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and exactly.")
WORDS = (
    "alpha",
    "bravo",
    "delta",
    "echo",
    "gamma",
    "hotel",
    "india",
    "kilo",
    "lima",
    "oscar",
    "tango",
    "zulu",
)

Task = Callable[[random.Random], tuple[str, str]]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, 20)
    stop = start + rng.randint(3, 8)
    return f"Count from {start} to {stop}.", " ".join(str(n) for n in range(start, stop + 1))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Repeat in capitals: {' '.join(words)}", " ".join(w.upper() for w in words)


def _list(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 5))
    items = "\n".join(f"- {w}" for w in words)
    return f"Make a list of: {', '.join(words)}", f"Here is the list:\n{items}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order: {' '.join(words)}", " ".join(reversed(words))


TASKS: tuple[Task, ...] = (_add, _count, _upper, _list, _reverse)


def make_conversations(n: int, seed: int = 0, *, shape: str = "openai") -> list[dict[str, Any]]:
    """`n` rows, OpenAI `{"id", "messages": [{role, content}]}` or ShareGPT `{"id", "conversations": [{from, value}]}`."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(1, 3)):
            question, answer = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"syn-{seed}-{index}", "messages": messages})
    return [to_sharegpt(r) for r in rows] if shape == "sharegpt" else rows


def to_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]
    return {"id": row["id"], "conversations": turns}


def corpus(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every message text, for training a tokenizer."""
    return [m["content"] for row in rows for m in row["messages"]]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
