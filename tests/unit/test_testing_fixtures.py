"""The test fixtures themselves: synthetic conversations and the tiny trained verifier."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from specops.testing.synthetic import corpus, make_conversations, to_sharegpt, write_jsonl


def test_conversations_are_deterministic_and_well_formed() -> None:
    rows = make_conversations(64, seed=3)
    assert rows == make_conversations(64, seed=3)
    assert rows != make_conversations(64, seed=4)
    assert len({r["id"] for r in rows}) == 64
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and 2 <= len(body) <= 6
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(len(r["messages"]) > 3 for r in rows)  # multi-turn


def test_answers_follow_the_task_rules() -> None:
    """The structure a model (and then a draft) can learn: answers are functions of the question."""
    checked = 0
    for row in make_conversations(100, seed=5):
        turns = [m["content"] for m in row["messages"] if m["role"] != "system"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            if question.startswith("What is "):
                a, _, b = question.removeprefix("What is ").removesuffix("?").split()
                assert answer == f"{a} plus {b} is {int(a) + int(b)}."
                checked += 1
            elif question.startswith("Reverse the order: "):
                assert answer.split() == question.split(": ")[1].split()[::-1]
                checked += 1
    assert checked > 20


def test_sharegpt_shape_and_jsonl_round_trip(tmp_path: Path) -> None:
    rows = make_conversations(5, seed=1)
    sharegpt = make_conversations(5, seed=1, shape="sharegpt")
    assert sharegpt == [to_sharegpt(r) for r in rows]
    assert {t["from"] for r in sharegpt for t in r["conversations"]} <= {"system", "human", "gpt"}
    assert [t["value"] for t in sharegpt[0]["conversations"]] == [m["content"] for m in rows[0]["messages"]]
    path = write_jsonl(tmp_path / "deep" / "rows.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert corpus(rows[:1]) == [m["content"] for m in rows[0]["messages"]]


def test_tokenizer_build_is_offline_and_deterministic(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from specops.testing.tiny import build_tiny_tokenizer

    first = build_tiny_tokenizer(tmp_path / "a", template="chatml")
    second = build_tiny_tokenizer(tmp_path / "b", template="chatml")
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert 512 <= len(tokenizer) <= 2048 and tokenizer.is_fast
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    ids = tokenizer("<|im_start|>user\nCount from 3 to 6.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens stay whole
    assert tokenizer.decode(ids) == "<|im_start|>user\nCount from 3 to 6.<|im_end|>"


def test_tiny_verifier_loads_as_a_normal_llama_directory(tiny_verifier_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_verifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 4
    assert (tiny_verifier_dir / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")

    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, k=k: captured.__setitem__(
                k, (args[0] if args else kwargs["hidden_states"])
            ),
            with_kwargs=True,
        )
        for k, layer in enumerate(model.model.layers)
    ]
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    assert len(out.hidden_states) == 5 and sorted(captured) == [0, 1, 2, 3]
    for k in range(4):  # a hook on decoder layer k sees hidden_states[k]
        torch.testing.assert_close(captured[k], out.hidden_states[k])


def test_tiny_verifier_is_trained_and_ends_its_turns(tiny_verifier_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_verifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_verifier_dir)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model.config).eval()
    held_out = make_conversations(8, seed=4242)

    def loss(m: torch.nn.Module) -> float:
        total = 0.0
        for row in held_out:
            ids = tokenizer.apply_chat_template(row["messages"], return_tensors="pt", return_dict=True)[
                "input_ids"
            ]
            with torch.no_grad():
                total += float(m(input_ids=ids, labels=ids).loss)
        return total / len(held_out)

    assert loss(model) < 1.0  # per token, prompts included
    assert loss(untrained) > 5.0  # about ln(vocab)
    messages = held_out[0]["messages"]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    prompt = tokenizer.apply_chat_template(
        messages[: first_user + 1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    assert tokenizer.eos_token_id in output[0, prompt["input_ids"].shape[1] :].tolist()


def test_cached_verifier_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from specops.testing import tiny

    monkeypatch.setenv("SPECOPS_CACHE", str(tmp_path))
    settings = {"num_layers": 2, "hidden_size": 32, "train_steps": 2}
    first = tiny.tiny_verifier("chatml", **settings)
    digest = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    assert first.is_relative_to(tmp_path / "testing") and not list(first.parent.glob(".tiny-*"))
    monkeypatch.setattr(tiny, "build_tiny_verifier", lambda *a, **k: pytest.fail("rebuilt"))
    assert tiny.tiny_verifier("chatml", **settings) == first
    monkeypatch.undo()
    rebuilt = tiny.build_tiny_verifier(tmp_path / "again", template="chatml", **settings)
    assert hashlib.sha256((rebuilt / "model.safetensors").read_bytes()).hexdigest() == digest  # deterministic
