"""What one generation run (or slice, or worker) did: the counts its report, its live progress
(`specops.generate_progress`) and the regenerate stage share, kept up to date while it runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerateReport:
    """What a run did; `ok` is False when examples or workers failed (a rerun retries them)."""

    written: int = 0
    """Examples handed to the sink in this run."""
    skipped: int = 0
    """Examples of this slice the sink already held (resume)."""
    dropped: int = 0
    """Conversations that yield no example (e.g. fewer loss tokens than processor.min_loss_tokens)."""
    failed: int = 0
    """Examples the engine could not process even alone (listed in failed_ids)."""
    tokens: int = 0
    """Tokens of the written examples."""
    regenerated: int = 0
    """Conversations answered by the verifier in this run (`regenerate`)."""
    regenerated_tokens: int = 0
    """Answer tokens the verifier generated in this run."""
    seconds: float = 0.0
    failed_ids: list[str] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.worker_errors

    def add(self, other: GenerateReport) -> None:
        """Fold a worker's counts into this report (seconds stay the caller's wall time)."""
        for name in (
            "written",
            "skipped",
            "dropped",
            "failed",
            "tokens",
            "regenerated",
            "regenerated_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed_ids.extend(other.failed_ids)
        self.worker_errors.extend(other.worker_errors)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1), "ok": self.ok}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateReport:
        return cls(**{k: v for k, v in data.items() if k not in ("tokens_per_s", "ok")})
