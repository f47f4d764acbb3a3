"""Chat templating and the assistant-only loss mask, by rendering boundaries.

`apply_chat_template(return_assistant_tokens_mask=True)` silently returns zeros for templates without
`{% generation %}` markers, so the mask is computed from the rendered text instead: the conversation
is rendered up to and through each assistant turn; the characters the turn adds, from its content
to the end of the turn (end-of-turn token included, surrounding whitespace excluded), are trained.
Headers and template scaffolding such as an empty `<think>\n\n</think>` block stay masked. Character
spans become token positions through the fast tokenizer's offset mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specops.config import ProcessorConfig
from specops.data.records import Conversation, Message, TokenizedExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """The template cannot render a conversation, or renders it inconsistently."""


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    chat_template: str | None,
    add_generation_prompt: bool = False,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            _as_dicts(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
        )
    except Exception as exc:  # jinja raises TemplateError, ValueError, ... : name the cause
        raise ChatTemplateError(f"chat_template: cannot render a conversation: {exc}") from None
    return str(text)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of each assistant turn's trained text."""
    full = render(tokenizer, messages, chat_template, add_generation_prompt)
    specials = sorted((t for t in tokenizer.all_special_tokens if t), key=len, reverse=True)
    spans: list[Span] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(tokenizer, messages[:index], chat_template) if index else ""
        through = render(tokenizer, messages[: index + 1], chat_template)
        if full.startswith(through) and through.startswith(before):
            span = _content_span(full, message.content, max(len(before), cursor), len(through))
        else:
            # The template renders history differently from a last turn (e.g. it drops reasoning
            # scaffolding from earlier turns): find the content in order, end at its end-of-turn token.
            span = _content_span(full, message.content, cursor, None)
            if span is not None:
                span = (span[0], _after_special(full, span[1], specials))
        if span is None:
            raise ChatTemplateError(
                f"chat_template: assistant turn {index} does not appear in the rendered text "
                "(the template rewrites assistant content; set processor.assistantOnlyLoss: false)"
            )
        if span[1] > span[0]:
            spans.append(span)
        cursor = span[1]
    return full, spans


def _content_span(full: str, content: str, start: int, end: int | None) -> Span | None:
    """From where the content starts to the end of the turn (None: the content's end), minus
    trailing whitespace."""
    needle = content.strip()
    if not needle:
        return (start, start)
    found = full.find(needle, start, len(full) if end is None else end)
    if found < 0:
        return None
    stop = found + len(needle) if end is None else end
    while stop > found + len(needle) and full[stop - 1].isspace():
        stop -= 1
    return (found, stop)


def _after_special(full: str, position: int, specials: Sequence[str]) -> int:
    """Extend `position` over an end-of-turn special token that directly follows it."""
    return next((position + len(t) for t in specials if full.startswith(t, position)), position)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    processor: ProcessorConfig,
    chat_template: str | None = None,
) -> TokenizedExample | None:
    """Token ids and loss mask, truncated to `max_length`; None when too little is trainable."""
    if conversation.text is not None:
        ids = list(tokenizer(conversation.text, add_special_tokens=True)["input_ids"])
        mask = [1] * len(ids)
    else:
        full, spans = assistant_spans(
            tokenizer, conversation.messages, chat_template, processor.add_generation_prompt
        )
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = (
            span_mask(encoded["offset_mapping"], spans) if processor.assistant_only_loss else [1] * len(ids)
        )
    ids, mask = ids[: processor.max_length], mask[: processor.max_length]
    if not ids or sum(mask) < processor.min_loss_tokens:
        return None
    return TokenizedExample(id=conversation.id, token_ids=ids, loss_mask=mask)


def span_mask(offsets: Sequence[Any], spans: Sequence[Span]) -> list[int]:
    """1 for every token whose characters overlap a span (offsets and spans are sorted)."""
    mask = [0] * len(offsets)
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if end > start and start < span_end and end > span_start:
            mask[position] = 1
    return mask
