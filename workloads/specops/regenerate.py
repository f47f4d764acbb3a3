"""Answer the dataset's prompts with the verifier itself before capturing hidden states.

A draft is judged on the verifier's own (greedy) text, so it learns most from that text rather than
from whatever model wrote the dataset's answers. For every conversation of the slice, assistant
turns are replaced in order (at most `regenerate.max_turns`): turn j is the verifier's greedy answer
to the conversation so far, earlier turns already replaced; a conversation ending with a user turn
gets an answer appended; assistant turns before the first user turn are dropped. Turns after the last replaced one are dropped (they reply to text that is
gone). An answer cut at `max_new_tokens` (or at `processor.max_length`) ends the conversation and is
marked `open_final`, so it renders without an end-of-turn token.

Answers are appended to JSONL files under `regenerate.path`, one per slice, each window fsynced,
and reused by every rerun: a killed run answers only what no file holds yet; a torn last line is
cut off. `regenerate.json` records who answered, and a different setup is refused. Progress (a
bar whose total is what is left to answer, log lines, a done line, the report's counts served as
metrics) goes through `specops.generate_progress.AnswerProgress`; this module never imports the
driver (`specops.generate`), which imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specops.config import ConfigError, DataGenConfig
from specops.data.chat import ChatTemplateError, render, template_sha256
from specops.data.records import Conversation, Message
from specops.engines.batching import windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from specops.engines.answers import AnswerEngine
    from specops.generate_progress import AnswerProgress

log = logging.getLogger(__name__)

META_FILE = "regenerate.json"
WINDOW_BATCHES = 4
"""Conversations are answered `WINDOW_BATCHES * regenerate.batch_size` at a time."""


def answers_dir(config: DataGenConfig) -> Path:
    """`regenerate.path`, else `<sync.path>/regenerated`, under an allowed root."""
    from specops.paths import resolve_allowed

    assert config.regenerate is not None
    if config.regenerate.path is not None:
        return resolve_allowed(config.regenerate.path, config.run.allowed_roots, "regenerate.path")
    assert config.sync.path is not None  # the config validator requires one of them
    return resolve_allowed(config.sync.path, config.run.allowed_roots, "sync.path") / "regenerated"


def answer_setup(config: DataGenConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What makes answers comparable: the verifier, the template and the answer budget."""
    from specops.verifier import verifier_identity

    assert config.regenerate is not None
    return {
        "verifier": verifier_identity(config.verifier),
        "chat_template_sha256": template_sha256(config.chat_template or tokenizer.chat_template),
        "max_new_tokens": config.regenerate.max_new_tokens,
        "max_turns": config.regenerate.max_turns,
        "max_length": config.sequence_limit,
    }


class AnswerFiles:
    """The JSONL files of one answers directory; this process appends to its slice's file only."""

    def __init__(self, directory: Path, setup: dict[str, Any], slice_name: str) -> None:
        from specops.stores.atomic import write_json_atomic

        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / META_FILE
        if meta.exists():
            recorded = json.loads(meta.read_text())
            if recorded != setup:
                changed = sorted(k for k in setup if recorded.get(k) != setup[k])
                raise ConfigError(
                    f"regenerate.path: {directory} holds answers made with other settings "
                    f"({', '.join(changed)} differ); use another directory or delete it"
                )
        else:
            write_json_atomic(meta, setup)
        self.directory = directory
        self.own = directory / f"answers-{slice_name}.jsonl"
        _cut_torn_tail(self.own)  # left by a crash; this process is the file's only writer

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("answers-*.jsonl"))

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every complete row of every file, first occurrence of an id only."""
        seen: set[str] = set()
        for path in self._files():
            with path.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.endswith(b"\n"):
                        break  # torn by a crash mid-write: never acknowledged
                    row = _parse(line, path, number)
                    if row["id"] not in seen:
                        seen.add(row["id"])
                        yield row

    def ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def append(self, conversations: Sequence[Conversation]) -> None:
        """Add rows durably."""
        with self.own.open("ab") as out:
            for conversation in conversations:
                out.write(json.dumps(to_row(conversation), ensure_ascii=False).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())


def _parse(line: bytes, path: Path, number: int) -> dict[str, Any]:
    """One answers row; anything else names the file and line (the files are plain data: editable)."""
    try:
        row = json.loads(line)
        from_row(row)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"regenerate.path: {path} line {number} is not an answers row ({exc!r})") from None
    return dict(row)


def _cut_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def to_row(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "messages": [{"role": m.role, "content": m.content} for m in conversation.messages],
        "text": conversation.text,
        "open_final": conversation.open_final,
    }


def from_row(row: dict[str, Any]) -> Conversation:
    return Conversation(
        id=row["id"],
        messages=tuple(Message(m["role"], m["content"]) for m in row["messages"]),
        text=row["text"],
        open_final=bool(row["open_final"]),
    )


# ---------------------------------------------------------------------------- answering


@dataclass
class _Pending:
    """One conversation being answered turn by turn."""

    id: str
    messages: list[Message]
    turn: int
    """Index of the next assistant message to write (== len(messages) to append one)."""
    answered: int = 0
    open_final: bool = False
    new_tokens: list[int] = field(default_factory=list)


def answer_slots(messages: Sequence[Message]) -> list[int]:
    """Where answers go: each assistant turn after the first user turn, plus one after a trailing
    user turn."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    slots = [i for i, m in enumerate(messages) if m.role == "assistant" and i > first_user]
    if messages and messages[-1].role == "user":
        slots.append(len(messages))
    return slots


def without_leading_answers(messages: Sequence[Message]) -> list[Message]:
    """Assistant turns before the first user turn answer nothing the verifier can see (datasets
    split long chats into pieces that start mid-way): they go, system prompts stay."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    return [m for i, m in enumerate(messages) if i >= first_user or m.role != "assistant"]


def regenerate_window(
    conversations: Sequence[Conversation],
    engine: AnswerEngine,
    tokenizer: PreTrainedTokenizerBase,
    config: DataGenConfig,
) -> tuple[list[Conversation], int, int]:
    """(the conversations with the verifier's answers, how many got one, new tokens generated). Plain-text rows pass
    through; a conversation with nothing to answer keeps no answer (so it yields no example); one
    the template cannot render is cut before the turn it failed on."""
    regen = config.regenerate
    assert regen is not None
    limit = config.sequence_limit
    todo: list[_Pending] = []
    done: list[Conversation] = []
    for conversation in conversations:
        if conversation.text is not None:
            done.append(conversation)
            continue
        messages = without_leading_answers(conversation.messages)
        slots = answer_slots(messages)
        if not slots:  # nothing to answer: no dataset answer is kept either
            done.append(Conversation(conversation.id, tuple(m for m in messages if m.role != "assistant")))
            continue
        todo.append(_Pending(conversation.id, messages, slots[0]))
    finished: list[_Pending] = []
    generated = 0
    while todo:
        prompts: list[list[int]] = []
        asking: list[_Pending] = []
        for item in todo:
            prompt = _prompt_ids(tokenizer, item.messages[: item.turn], config.chat_template)
            if prompt is None or len(prompt) >= limit:
                item.messages = item.messages[: item.turn]  # no room (or no render) for this answer
                finished.append(item)
                continue
            prompts.append(prompt)
            asking.append(item)
        outputs = engine.answer(prompts, regen.max_new_tokens) if prompts else []
        todo = []
        for item, prompt, tokens in zip(asking, prompts, outputs, strict=True):
            tokens = tokens[: limit - len(prompt)]
            generated += len(tokens)
            ended = bool(tokens) and tokens[-1] in engine.eos
            text = str(tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True))
            answer = Message("assistant", text)
            if item.turn < len(item.messages):
                item.messages[item.turn] = answer
            else:
                item.messages.append(answer)
            item.answered += 1
            nxt = [s for s in answer_slots(item.messages) if s > item.turn]
            more = ended and nxt and (regen.max_turns is None or item.answered < regen.max_turns)
            if more:
                item.turn = nxt[0]
                todo.append(item)
            else:
                item.messages = item.messages[: item.turn + 1]
                item.open_final = not ended
                finished.append(item)
    order = {c.id: i for i, c in enumerate(conversations)}
    out = done + [
        Conversation(id=p.id, messages=tuple(p.messages), open_final=p.open_final) for p in finished
    ]
    answered = sum(p.answered > 0 for p in finished)
    return sorted(out, key=lambda c: order[c.id]), answered, generated


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], chat_template: str | None
) -> list[int] | None:
    """The conversation so far with the template's generation prompt, as token ids."""
    try:
        text = render(tokenizer, messages, chat_template, add_generation_prompt=True)
    except ChatTemplateError as exc:
        log.warning("cannot render a prompt to answer: %s", exc)
        return None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def regenerated_slice(
    config: DataGenConfig,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[Conversation],
    progress: AnswerProgress,
    count_left: Callable[[set[str]], int],
) -> Iterator[Conversation]:
    """This slice's conversations with the verifier's answers: every one is answered (or read back
    from an earlier run's files) before the first is yielded, so the answering engine is closed
    before the capture engine loads. The engine loads only when something is left to answer.

    `count_left(ids)` counts the slice's conversations not in `ids` (one pass over the sources):
    with the ids the answers files hold, the progress total."""
    from specops.engines.answers import load_answer_engine

    assert config.regenerate is not None
    run = config.run
    files = AnswerFiles(
        answers_dir(config), answer_setup(config, tokenizer), f"{run.shard_index}-of-{run.num_shards}"
    )
    known = files.ids()
    progress.expect(count_left(known))
    wanted: set[str] = set()
    engine: AnswerEngine | None = None
    try:
        with progress.bar(disable=not progress.expected) as bar:  # none: everything was answered
            for window in windows(conversations, WINDOW_BATCHES * config.regenerate.batch_size):
                wanted.update(c.id for c in window)
                todo = [c for c in window if c.id not in known]
                if not todo:
                    continue
                if engine is None:
                    engine = load_answer_engine(config)
                    progress.start()
                conversations_out, answered, tokens = regenerate_window(todo, engine, tokenizer, config)
                files.append(conversations_out)
                progress.add(len(todo), answered, tokens)
                progress.show(bar)
    finally:
        if engine is not None:
            engine.close()
    progress.finish(reused=len(wanted & known))
    for row in files.rows():
        if row["id"] in wanted:
            yield from_row(row)
