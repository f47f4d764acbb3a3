"""What a Job's status says: the view phases are decided on, and its index ranges (`0-3,7`).

Apart from status.py so that every reader of a Job (status, the upload steps, the handlers) uses
one view without importing the status module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def parse_ranges(text: str) -> set[int]:
    """`0-3,7` (as in Job.status.completedIndexes) -> {0, 1, 2, 3, 7}."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def format_ranges(indexes: set[int]) -> str:
    parts: list[str] = []
    for i in sorted(indexes):
        if parts and parts[-1].split("-")[-1] == str(i - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


@dataclass(frozen=True)
class JobView:
    """The parts of a Job's status that decide a phase."""

    exists: bool = False
    suspended: bool = False
    active: int = 0
    """Pods not finished, Pending ones included: not the pods running."""
    ready: int | None = None
    """Pods Ready (None on servers before v1.24, which do not count them)."""
    succeeded: int = 0
    failed_indexes: int = 0
    complete: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""

    @property
    def unsure(self) -> bool:
        """Some unfinished pods may not be running: their pods must be read to tell."""
        return self.active > (self.ready or 0)

    @classmethod
    def of(cls, job: Obj | None) -> JobView:
        if job is None:
            return cls()
        status = job.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        failed = conditions.get("Failed") or {}
        return cls(
            exists=True,
            suspended=bool((job.get("spec") or {}).get("suspend")) or "Suspended" in conditions,
            active=int(status.get("active") or 0),
            ready=int(status["ready"]) if status.get("ready") is not None else None,
            succeeded=int(status.get("succeeded") or 0),
            failed_indexes=len(parse_ranges(status.get("failedIndexes") or "")),
            complete="Complete" in conditions,
            failed=bool(failed),
            reason=str(failed.get("reason") or ""),
            message=str(failed.get("message") or ""),
        )


NO_JOB = JobView()
"""The view of a Job that does not exist (yet)."""
