"""The records that flow from sources through chat templating to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    role: str
    """Normalized: system | user | assistant | tool."""
    content: str


@dataclass(frozen=True)
class Conversation:
    """One source row, normalized to OpenAI-style messages (or plain text)."""

    id: str
    """Stable `<dataset>/<row>/<turn>` id."""
    messages: tuple[Message, ...] = ()
    text: str | None = None
    """Set instead of messages for plain-text sources (every token is trained)."""
    open_final: bool = False
    """The last (assistant) message was cut off: it renders without its end-of-turn token."""


@dataclass(frozen=True)
class TokenizedExample:
    """What the engine consumes: token ids and the assistant-only loss mask, same length."""

    id: str
    token_ids: list[int]
    loss_mask: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.loss_mask):
            raise ValueError(
                f"{self.id}: token_ids ({len(self.token_ids)}) and loss_mask ({len(self.loss_mask)}) differ in length"
            )
