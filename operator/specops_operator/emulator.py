"""An in-memory Kubernetes API for tests and benches: kmock plus what a real server stamps.

kmock stores objects as given; kopf, however, relies on what every real API server adds:
uid, resourceVersion (new on every write), the namespace from the URL, a generation that only
spec changes bump, creationTimestamp, and names from generateName (Events). Imports kmock, a
development dependency: only tests and `bench/operator.py` use this module.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import kmock

CRD_RESOURCES = {
    "specops.dev/v1alpha1/speculatordatagens": ("SpeculatorDataGen", {"status", "scale"}),
    "specops.dev/v1alpha1/speculatortrainings": ("SpeculatorTraining", {"status"}),
}


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch (null deletes), without touching `base`."""
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


class StampingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with a real server's metadata bookkeeping on every write.

    `history`: keep only this many past requests (None = all, for assertions). kmock matches
    every request against its whole history, so long benches need a bound.
    """

    _versions = itertools.count(1)
    history: int | None = None

    async def _handle(self, request: kmock.Request) -> Any:
        if self.history is not None and len(self._requests) > self.history:
            del self._requests[: -self.history]
        if isinstance(request.data, list) and request.action == kmock.action.UPDATE:
            self._check_json_patch_tests(request)
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None and request.action is not None:
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if request.action == kmock.action.CREATE:
                if "name" not in meta and "generateName" in meta:
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
                meta.setdefault("namespace", request.namespace)
                meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=timestamp())
            elif request.action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and request.subresource is None and key in self.objects:
                    current = self.objects[key]
                    if current.get("spec") != merge_patch(current.get("spec") or {}, data["spec"]):
                        meta["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
        return await super()._handle(request)

    def _check_json_patch_tests(self, request: kmock.Request) -> None:
        """A failed `test` op is 422 on a real server (kopf's optimistic-concurrency signal)."""
        if request.resource is None or request.name is None:
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects:
            return
        current: Any = dict(self.objects[key].raw)
        for op in request.data:
            if op.get("op") != "test":
                continue
            node = current
            for part in str(op["path"]).strip("/").split("/"):
                node = node.get(part) if isinstance(node, dict) else None
            if node != op.get("value"):
                raise kmock.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message=f"test of {op['path']} failed: {node!r} != {op.get('value')!r}",
                )

    def declare_resources(self) -> None:
        """Built-in kinds plus our CRDs (with their subresources), as discovery reports them."""
        self.resources.load_bundled()
        for key, (kind, subresources) in CRD_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                namespaced=True,
                subresources=subresources,
                verbs={"get", "list", "watch", "create", "patch", "delete"},
            )
