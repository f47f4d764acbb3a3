"""`regenerate`: the verifier answers the prompts (greedy) before its hidden states are captured."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from specops.config import ConfigError, DataGenConfig
from specops.data.chat import render, tokenize_conversation
from specops.data.records import Conversation, Message
from specops.engines.answers import TransformersAnswers, cut_at_eos
from specops.evaluate import eos_ids, greedy_decode
from specops.generate import generate_data
from specops.regenerate import AnswerFiles, answer_slots, regenerate_window
from specops.stores.disk import DiskStore
from specops.testing.synthetic import make_conversations, write_jsonl
from specops.verifier import load_model, load_tokenizer


def config(root: Path, verifier: Path, data: Path, **regenerate: Any) -> DataGenConfig:
    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(verifier)},
            "datasets": [{"path": str(data), "name": "syn"}],
            "regenerate": {"max_new_tokens": 24, "batch_size": 4, **regenerate},
            "processor": {"max_length": 256},
            "engine": {"device": "cpu", "batch_size": 4},
            "sync": {"path": str(root / "out"), "shard_size": 4},
            "run": {"allowed_roots": [str(root), str(verifier.parent)]},
        }
    )


@pytest.fixture(scope="module")
def verifier(tiny_verifier_dir: Path) -> Any:
    from specops.config import VerifierConfig

    cfg = VerifierConfig(name_or_path=str(tiny_verifier_dir))
    roots = [str(tiny_verifier_dir.parent)]
    model = load_model(cfg, dtype=torch.float32, device=torch.device("cpu"), allowed_roots=roots)
    return model, load_tokenizer(cfg, roots)


def reference_answer(verifier: Any, messages: Sequence[Message], max_new: int) -> tuple[str, bool]:
    """The verifier's own unbatched greedy answer to `messages` (text, ended by itself)."""
    model, tokenizer = verifier
    prompt = tokenizer(
        render(tokenizer, messages, None, add_generation_prompt=True), add_special_tokens=False
    )
    tokens = greedy_decode(model, prompt["input_ids"], max_new, eos_ids(model))
    ended = bool(tokens) and tokens[-1] in eos_ids(model)
    return tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True), ended


def conversations(rows: list[dict[str, Any]]) -> list[Conversation]:
    return [
        Conversation(f"syn/{i}/0", tuple(Message(m["role"], m["content"]) for m in row["messages"]))
        for i, row in enumerate(rows)
    ]


def test_every_turn_is_the_verifier_s_greedy_answer_to_the_regenerated_history(
    tmp_path: Path, tiny_verifier_dir: Path, verifier: Any
) -> None:
    model, tokenizer = verifier
    source = conversations(make_conversations(10, seed=5))
    cfg = config(tmp_path, tiny_verifier_dir, tmp_path / "unused.jsonl", max_new_tokens=40)
    engine = TransformersAnswers(model, eos_ids(model), batch_size=3)  # ragged groups, left padding
    out, answered, generated = regenerate_window(source, engine, tokenizer, cfg)
    assert [c.id for c in out] == [c.id for c in source]
    multi_turn = 0
    for before, after in zip(source, out, strict=True):
        assert [m.role for m in after.messages] == [m.role for m in before.messages][: len(after.messages)]
        slots = answer_slots(after.messages)
        multi_turn += len(slots) > 1
        for slot in slots:
            text, ended = reference_answer(verifier, after.messages[:slot], 40)
            assert after.messages[slot].content == text, (after.id, slot)
            if not ended:  # a cut answer ends the conversation, open
                assert slot == len(after.messages) - 1 and after.open_final
        # users' turns are kept verbatim
        users = [m for m in before.messages if m.role != "assistant"]
        assert [m for m in after.messages if m.role != "assistant"] == users[
            : len([m for m in after.messages if m.role != "assistant"])
        ]
    assert multi_turn >= 3 and generated > 0 and answered == len(source)


def test_max_turns_trailing_user_turns_and_plain_text(
    tmp_path: Path, tiny_verifier_dir: Path, verifier: Any
) -> None:
    model, tokenizer = verifier
    engine = TransformersAnswers(model, eos_ids(model), batch_size=8)
    cfg = config(tmp_path, tiny_verifier_dir, tmp_path / "unused.jsonl", max_turns=1, max_new_tokens=40)
    two_turns = conversations(make_conversations(4, seed=6))
    prompt_only = Conversation("q/0/0", (Message("user", "What is 2 plus 3?"),))
    text = Conversation("t/0/0", text="plain text is trained as it is")
    mid_way = Conversation(  # a chat split mid-way: its first answer replies to nothing we have
        "m/0/0",
        (Message("assistant", "an answer"), Message("user", "What is 2 plus 3?"), Message("assistant", "5")),
    )
    no_prompt = Conversation("n/0/0", (Message("system", "Be brief."), Message("assistant", "hello")))
    out, answered, _ = regenerate_window(
        [*two_turns, prompt_only, text, mid_way, no_prompt], engine, tokenizer, cfg
    )
    assert answered == 6
    for conversation in out[:4]:
        assert len(answer_slots(conversation.messages)) == 1  # cut after the first answer
        assert conversation.messages[-1].role == "assistant"
    assert out[4].messages[:1] == prompt_only.messages and out[4].messages[1].role == "assistant"
    assert out[4].messages[1].content == reference_answer(verifier, prompt_only.messages, 40)[0]
    assert out[5] == text
    assert [m.role for m in out[6].messages] == ["user", "assistant"]
    assert out[6].messages[1].content == reference_answer(verifier, prompt_only.messages, 40)[0]
    assert out[7].messages == (Message("system", "Be brief."),)  # nothing trainable is left
    assert tokenize_conversation(tokenizer, out[7], cfg.processor) is None
    assert tokenize_conversation(tokenizer, Conversation("e/0/0"), cfg.processor) is None


def test_a_cut_answer_is_open_and_its_end_of_turn_is_not_trained(
    tmp_path: Path, tiny_verifier_dir: Path, verifier: Any
) -> None:
    model, tokenizer = verifier
    engine = TransformersAnswers(model, eos_ids(model), batch_size=4)
    source = conversations(make_conversations(4, seed=8))
    cut, _, _ = regenerate_window(
        source, engine, tokenizer, config(tmp_path, tiny_verifier_dir, tmp_path, max_new_tokens=2)
    )
    processor = config(tmp_path, tiny_verifier_dir, tmp_path).processor
    end_of_turn = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for conversation in cut:
        assert conversation.open_final and len(answer_slots(conversation.messages)) == 1
        example = tokenize_conversation(tokenizer, conversation, processor)
        assert example is not None
        trained = [t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if m]
        assert trained and end_of_turn not in trained and example.token_ids[-1] != end_of_turn
        closed = tokenize_conversation(
            tokenizer, Conversation(conversation.id, conversation.messages), processor
        )
        assert closed is not None and end_of_turn in closed.token_ids  # the same text, closed, would train it


def test_cut_at_eos_keeps_the_eos_and_the_budget() -> None:
    assert cut_at_eos([5, 6, 2, 7], {2}, 10) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7, 8], {2}, 3) == [5, 6, 7]
    assert cut_at_eos([], {2}, 3) == []


def stored(path: Path) -> dict[str, Any]:
    store = DiskStore.open(path, [path], verify="digest")
    return {e["id"]: e for part in store.partitions() for e in store.read(part)}


def test_generate_data_stores_the_regenerated_conversations(
    tmp_path: Path, tiny_verifier_dir: Path, verifier: Any
) -> None:
    _, tokenizer = verifier
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(9, seed=4))
    cfg = config(tmp_path, tiny_verifier_dir, data)
    report = generate_data(cfg)
    assert (report.regenerated, report.written) == (9, 9) and report.regenerated_tokens > 0
    files = AnswerFiles(tmp_path / "out" / "regenerated", _setup(cfg, tokenizer), "0-of-1")
    answered = {row["id"]: row for row in files.rows()}
    examples = stored(tmp_path / "out")
    assert set(examples) == set(answered) == {f"syn/{i}/0" for i in range(9)}
    for example_id, row in answered.items():
        conversation = Conversation(
            example_id,
            tuple(Message(m["role"], m["content"]) for m in row["messages"]),
            open_final=row["open_final"],
        )
        expected = tokenize_conversation(tokenizer, conversation, cfg.processor)
        assert expected is not None
        assert examples[example_id]["token_ids"].tolist() == expected.token_ids
        assert examples[example_id]["loss_mask"].tolist() == expected.loss_mask
    # A rerun has nothing to answer and loads no model.
    again = generate_data(cfg)
    assert (again.regenerated, again.written, again.skipped) == (0, 0, 9)


def _setup(cfg: DataGenConfig, tokenizer: Any) -> dict[str, Any]:
    from specops.regenerate import answer_setup

    return answer_setup(cfg, tokenizer)


class FlakyEngine:
    """Wraps the real engine; raises on call number `fail_on` (a crash mid-run) and counts prompts."""

    def __init__(self, real: TransformersAnswers, fail_on: int | None) -> None:
        self.real, self.fail_on, self.calls, self.prompts = real, fail_on, 0, 0
        self.eos = real.eos

    def answer(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("engine died")
        self.prompts += len(prompts)
        return self.real.answer(prompts, max_new_tokens)

    def close(self) -> None:
        pass


def test_a_crashed_run_answers_only_what_is_missing_and_stores_each_example_once(
    tmp_path: Path, tiny_verifier_dir: Path, verifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = verifier
    rows = make_conversations(20, seed=12)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = config(tmp_path, tiny_verifier_dir, data, max_turns=1, batch_size=2)  # windows of 8
    engines: list[FlakyEngine] = []

    def engine_dying_on(call: int | None) -> None:
        def load(_: DataGenConfig) -> FlakyEngine:
            engines.append(FlakyEngine(TransformersAnswers(model, eos_ids(model), 2), call))
            return engines[-1]

        monkeypatch.setattr("specops.engines.answers.load_answer_engine", load)

    engine_dying_on(2)  # the second window dies
    with pytest.raises(RuntimeError, match="engine died"):
        generate_data(cfg)
    answers = tmp_path / "out" / "regenerated" / "answers-0-of-1.jsonl"
    first_window = answers.read_text().splitlines()
    assert len(first_window) == 8
    with answers.open("a") as torn:  # a crash in the middle of a write
        torn.write('{"id": "syn/19/0", "messages": [{"role": "us')
    engine_dying_on(None)
    report = generate_data(cfg)
    assert engines[-1].prompts == 12 and report.regenerated == 12  # only the missing ones
    lines = answers.read_text().splitlines()
    assert lines[:8] == first_window and len(lines) == 20
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(f"syn/{i}/0" for i in range(20))
    assert sorted(stored(tmp_path / "out")) == sorted(f"syn/{i}/0" for i in range(20))

    # The same answers as one uninterrupted run.
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    generate_data(
        config(fresh, tiny_verifier_dir, write_jsonl(fresh / "d.jsonl", rows), max_turns=1, batch_size=2)
    )
    uninterrupted = (fresh / "out" / "regenerated" / "answers-0-of-1.jsonl").read_text().splitlines()
    assert sorted(uninterrupted) == sorted(lines)


def test_answers_made_with_other_settings_are_refused(tmp_path: Path, tiny_verifier_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(3, seed=2))
    generate_data(config(tmp_path, tiny_verifier_dir, data, max_new_tokens=8))
    with pytest.raises(ConfigError, match=r"regenerate\.path: .*\(max_new_tokens differ\)"):
        generate_data(config(tmp_path, tiny_verifier_dir, data, max_new_tokens=9))


def test_a_damaged_answers_file_is_named(tmp_path: Path, tiny_verifier_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", make_conversations(3, seed=2))
    cfg = config(tmp_path, tiny_verifier_dir, data, max_new_tokens=8)
    generate_data(cfg)
    answers = tmp_path / "out" / "regenerated" / "answers-0-of-1.jsonl"
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(lines[0] + '{"id": "syn/9/0"}\n' + "".join(lines[1:]))
    with pytest.raises(ConfigError, match=r"answers-0-of-1\.jsonl line 2 is not an answers row"):
        generate_data(cfg)


def test_config_rules(tmp_path: Path) -> None:
    base = {"verifier": {"name_or_path": "v"}, "datasets": [{"path": "d.jsonl"}], "regenerate": {}}
    with pytest.raises(ValueError, match=r"regenerate\.path is required when sync\.kind is 'zmq'"):
        DataGenConfig.model_validate({**base, "sync": {"kind": "zmq", "url": "tcp://b:5555"}})
    with pytest.raises(ValueError, match="claim_ranges"):
        DataGenConfig.model_validate(
            {
                **base,
                "regenerate": {"path": "a"},
                "sync": {"kind": "zmq", "url": "tcp://b:5555", "claimRanges": 4},
            }
        )
    ok = DataGenConfig.model_validate(
        {**base, "regenerate": {"maxNewTokens": 64, "path": "a"}, "sync": {"path": "o"}}
    )
    assert ok.regenerate is not None and ok.regenerate.max_new_tokens == 64
    with pytest.raises(ValueError, match=r"max_new_tokens|maxNewTokens"):
        DataGenConfig.model_validate({**base, "regenerate": {"maxNewTokens": 0}, "sync": {"path": "o"}})
