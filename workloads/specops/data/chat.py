"""Chat templating and the assistant-only loss mask, found by diffing renders.

`apply_chat_template(return_assistant_tokens_mask=True)` silently returns zeros for templates without
`{% generation %}` markers, so the mask comes from the rendered text instead. For each assistant
turn the conversation is rendered twice: as is, and with that turn's content replaced by a
sentinel. Everything before the first and after the last differing character is template text
shared by both renders, so the differing region of the real render is exactly where the template
put the turn's content, wherever the template puts it: a last turn and a history turn may render
differently (Qwen3 adds an empty `<think>\n\n</think>` block only after the last user message),
content may be trimmed, and scaffolding around it stays untrained.

Trained per assistant turn: the rendered content, plus the special token that directly follows it
(`<|eot_id|>`, `<|im_end|>`, `</s>`...), because the model must learn to end its turn there. Any
text between the content and that token, role headers, system and user turns stay masked.
Character spans become token positions through the fast tokenizer's offset mapping: a token is
trained when any of its characters is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specops.config import ConfigError, ProcessorConfig
from specops.data.records import Conversation, Message, TokenizedExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]

SENTINEL = "\ue000specops sentinel\ue001"
"""Stand-in content: private-use delimiters no real text starts or ends with; lower case so a
template that rewrites content (e.g. `| upper`) is caught instead of silently mis-masked."""


def template_sha256(template: object) -> str:
    """What stores and answer files record of the chat template ("" for none; tokenizers may
    hold several templates in a dict)."""
    return hashlib.sha256(str(template).encode()).hexdigest() if template else ""


class ChatTemplateError(ValueError):
    """The template cannot render this conversation (the conversation is dropped, not the run)."""


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    chat_template: str | None,
    add_generation_prompt: bool = False,
    open_final: bool = False,
) -> str:
    """The conversation as text; a template that does not compile is a config error.

    `open_final` renders the last message as unfinished (no end-of-turn after it).
    """
    from jinja2 import TemplateSyntaxError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not open_final,
            continue_final_message=open_final,
            chat_template=chat_template,
        )
    except TemplateSyntaxError as exc:
        raise ConfigError(f"chat_template: not a valid Jinja template: {exc}") from None
    except Exception as exc:  # templates raise anything (raise_exception, TypeError...): name the cause
        raise ChatTemplateError(f"chat_template: cannot render this conversation: {exc}") from None
    return str(text)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    open_final: bool = False,
) -> tuple[str, list[Span]]:
    """The rendered conversation and, per assistant turn, the character span to train."""
    full = render(tokenizer, messages, chat_template, add_generation_prompt, open_final)
    specials = _special_texts(tokenizer)
    spans: list[Span] = []
    for index, message in enumerate(messages):
        if message.role != "assistant" or not message.content:
            continue
        probe = [*messages[:index], Message("assistant", SENTINEL), *messages[index + 1 :]]
        marked = render(tokenizer, probe, chat_template, add_generation_prompt, open_final)
        head = _common_prefix(full, marked)
        tail = _common_prefix(full[head:][::-1], marked[head:][::-1])
        if SENTINEL not in marked[head : len(marked) - tail]:
            raise ChatTemplateError(
                f"chat_template: assistant turn {index} is not rendered verbatim (the template rewrites "
                "assistant content); set processor.assistantOnlyLoss: false to train every token"
            )
        start, stop = head, len(full) - tail
        if stop > start:
            spans.append((start, stop + _special_at(full, stop, specials)))
    return full, sorted(spans)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on C-speed slice comparisons."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts of the special tokens (end-of-turn candidates), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(t) for t in tokenizer.all_special_tokens}
    texts |= {str(t.content) for t in added.values() if getattr(t, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def _special_at(text: str, position: int, specials: Sequence[str]) -> int:
    """Length of the special token starting exactly at `position` (0 when none does)."""
    return next((len(t) for t in specials if text.startswith(t, position)), 0)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    processor: ProcessorConfig,
    chat_template: str | None = None,
) -> TokenizedExample | None:
    """Token ids and loss mask, truncated to `max_length`; None when too little is trainable.

    `loss_mask[t] == 1` means token `t` is a training target (predicted from the tokens before it).
    Plain-text conversations train every token and get the tokenizer's own special tokens (BOS).
    """
    if conversation.text is not None:
        ids = list(tokenizer(conversation.text, add_special_tokens=True)["input_ids"])
        mask = [1] * len(ids)
    elif not conversation.messages:
        return None  # e.g. nothing was left to answer (regenerate)
    else:
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat_template: the verifier tokenizer has no chat template; set chat_template")
        if processor.assistant_only_loss:
            full, spans = assistant_spans(
                tokenizer,
                conversation.messages,
                chat_template,
                processor.add_generation_prompt,
                conversation.open_final,
            )
            offsets = _offsets(tokenizer, full)
            ids = list(offsets["input_ids"])
            mask = span_mask(offsets["offset_mapping"], spans)
        else:
            full = render(
                tokenizer,
                conversation.messages,
                chat_template,
                processor.add_generation_prompt,
                conversation.open_final,
            )
            ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
            mask = [1] * len(ids)
    ids, mask = ids[: processor.max_length], mask[: processor.max_length]
    if not ids or sum(mask) < processor.min_loss_tokens:
        return None
    return TokenizedExample(id=conversation.id, token_ids=ids, loss_mask=mask)


def _offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> Any:
    """Ids with character offsets; only fast (Rust) tokenizers have them."""
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ConfigError(
            f"processor.assistantOnlyLoss needs a fast tokenizer with offsets; "
            f"{type(tokenizer).__name__} has none (set processor.assistantOnlyLoss: false)"
        ) from None


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
