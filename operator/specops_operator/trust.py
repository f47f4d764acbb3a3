"""The operator's trust settings: which images and ServiceAccounts a CR may give the pods the
operator creates (the allow-list), and who may reach a stream broker's metrics port.

A CR author picks the image and ServiceAccount of pods that the operator creates under its own
role, so without a list, whoever may create a SpecOps resource may run any image with any
ServiceAccount of the namespace. The operator refuses a CR that names one outside the lists
(`Stalled`, reason `NotAllowed`) before it creates anything. Pure: no API calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from specops.config import ConfigError
from specops_operator.api import PodSettings, Resource, SpeculatorTraining


def image_allowed(image: str, prefix: str) -> bool:
    """`prefix` ending in `/` admits every image under that path; otherwise it is a repository
    (or a full image reference) and admits it with any tag or digest. A bare string prefix would
    let `ghcr.io/acme` admit `ghcr.io/acme-evil/x`, hence the boundaries."""
    if prefix.endswith("/"):
        return image.startswith(prefix)
    return image == prefix or any(image.startswith(prefix + sep) for sep in (":", "@", "/"))


@dataclass(frozen=True)
class AllowList:
    """Empty tuples allow everything (an operator started without lists); the chart sets both."""

    images: tuple[str, ...] = ()
    """Image prefixes (see `image_allowed`) for `pod.image`; a CR naming no image gets the
    operator's own workload image, which is always allowed."""
    service_accounts: tuple[str, ...] = ()
    """ServiceAccount names for `pod.serviceAccountName`; unset is always allowed (no token)."""

    @classmethod
    def parse(cls, images: str | None, service_accounts: str | None) -> AllowList:
        """From the operator's settings: JSON lists of strings (what the chart passes)."""
        return cls(
            _strings(images, "--allowed-images"), _strings(service_accounts, "--allowed-service-accounts")
        )

    def refusals(self, cr: Resource) -> list[str]:
        """One message per field outside the lists, naming it as `spec.<camelCase path>`."""
        out = []
        for path, pod in _pods(cr):
            if self.images and pod.image and not any(image_allowed(pod.image, p) for p in self.images):
                allowed = ", ".join(self.images)
                out.append(f"{path}.image: {pod.image!r} is not allowed (allowed image prefixes: {allowed})")
            account = pod.service_account_name
            if self.service_accounts and account and account not in self.service_accounts:
                allowed = ", ".join(self.service_accounts)
                out.append(
                    f"{path}.serviceAccountName: {account!r} is not allowed (allowed: {allowed}; "
                    "or leave it unset)"
                )
        return out


def _pods(cr: Resource) -> Iterator[tuple[str, PodSettings]]:
    """Every pod setting of a CR, with its field path (a training's inline dataGen included)."""
    yield "spec.pod", cr.spec.pod
    if isinstance(cr, SpeculatorTraining) and cr.spec.data_gen is not None:
        yield "spec.dataGen.pod", cr.spec.data_gen.pod


PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})


def _json_list(
    raw: str | None, option: str, item_ok: Callable[[Any], bool], expected: str
) -> tuple[Any, ...]:
    """A JSON list setting of the operator (empty or unset: none); one-line error naming `option`."""
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(item_ok(v) for v in value):
        raise ConfigError(f"{option}: expected a JSON list of {expected}, got {raw!r:.200}")
    return tuple(value)


def _strings(raw: str | None, option: str) -> tuple[str, ...]:
    return _json_list(raw, option, lambda v: isinstance(v, str) and bool(v), "non-empty strings")


def parse_peers(raw: str | None, option: str) -> tuple[dict[str, Any], ...]:
    """NetworkPolicy peers (`podSelector` / `namespaceSelector` / `ipBlock` objects) as JSON."""
    return _json_list(
        raw,
        option,
        lambda v: isinstance(v, dict) and bool(v) and set(v) <= PEER_KEYS,
        f"NetworkPolicy peers (objects with {', '.join(sorted(PEER_KEYS))})",
    )
