"""kmock-based operator tests: an emulator that stamps objects like a real API server, and a
fixture that runs the operator (our kopf registry) against it with short timings."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from specops_operator.builders.common import Defaults
from specops_operator.emulator import StampingEmulator, timestamp
from specops_operator.handlers import Context, configure, register
from specops_operator.kube import PLURALS, Kube, collection_path, object_path

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": StampingEmulator}


class Api:
    """Async test-side client of the emulator (the operator uses its own sync client)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url = str(server.url).rstrip("/")

    async def _call(
        self, method: str, path: str, body: Obj | None = None, content_type: str = "application/json"
    ) -> Obj:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, json=body, headers={"Content-Type": content_type}
            ) as response,
        ):
            data = await response.json(content_type=None)
            assert response.status < 300, (response.status, data)
            return data

    async def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return await self._call(
            "POST", collection_path(obj["apiVersion"], obj["kind"], meta["namespace"]), obj
        )

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        body: Obj,
        subresource: str | None = None,
    ) -> Obj:
        path = object_path(api_version, kind, namespace, name, subresource)
        return await self._call("PATCH", path, body, "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> Obj:
        return await self._call("DELETE", object_path(api_version, kind, namespace, name))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        key = (
            f"{api_version}/{PLURALS[kind]}" if "/" in api_version else f"v1/{PLURALS[kind]}",
            namespace,
            name,
        )
        try:
            obj = self.server.objects[key]
        except KeyError:
            return None
        return None if obj.deleted else copy.deepcopy(dict(obj.raw))

    def children(self, kind: str, namespace: str = "ml") -> list[Obj]:
        """Every stored object of a kind (Events included) in a namespace."""
        plural = {**PLURALS, "Event": "events"}[kind]
        out = []
        for (resource, ns, _name), obj in self.server.objects.items():
            if resource.plural == plural and ns == namespace and not obj.deleted:
                out.append(copy.deepcopy(dict(obj.raw)))
        return out

    async def until(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = check()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what or check}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(kmock: StampingEmulator) -> Api:
    kmock.declare_resources()
    return Api(kmock)


def settings() -> kopf.OperatorSettings:
    out = kopf.OperatorSettings()
    configure(out)
    out.watching.server_timeout = 1
    out.watching.client_timeout = 10
    out.watching.reconnect_backoff = 0.1
    out.queueing.idle_timeout = 0.5
    out.queueing.batch_window = 0.01
    out.queueing.exit_timeout = 0.5
    out.posting.enabled = True
    return out


class OperatorThread(threading.Thread):
    """The operator on its own event loop; stopping cancels it (kopf then skips its 5 s grace for
    "hung" tasks, and it never cancels tasks of the test's loop)."""

    def __init__(self, coroutine: Any) -> None:
        super().__init__(daemon=True)
        self.coroutine = coroutine
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None

    def run(self) -> None:
        self.task = self.loop.create_task(self.coroutine)
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)
        self.loop.close()

    def stop(self) -> None:
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


@dataclass
class Running:
    """One started operator: its handler context, and how to stop it."""

    ctx: Context
    thread: OperatorThread

    async def stop(self) -> None:
        self.thread.stop()
        await asyncio.to_thread(self.thread.join, 10)
        assert not self.thread.is_alive(), "the operator did not stop"


Runner = Callable[..., Awaitable[Running]]


@pytest.fixture
async def operator(api: Api) -> AsyncIterator[Runner]:
    """Start the operator (our registry, short timings) against the emulator; stopped at teardown."""
    started: list[Running] = []

    async def start(interval: float = 0.3, data_grace: float = 120.0) -> Running:
        ctx = Context(
            kube=Kube.for_host(api.url),
            defaults=Defaults(image="specops/workload:test"),
            interval=interval,
            backoff=0.2,
            data_grace=data_grace,
        )
        registry = kopf.OperatorRegistry()
        register(registry, ctx)

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=api.url, insecure=True)

        ready = threading.Event()
        thread = OperatorThread(
            kopf.operator(
                registry=registry, settings=settings(), standalone=True, clusterwide=True, ready_flag=ready
            )
        )
        thread.start()
        started.append(Running(ctx, thread))
        await api.until(ready.is_set, what="operator ready")
        return started[-1]

    yield start
    for running in started:
        if running.thread.is_alive():
            await running.stop()


def example(name: str, index: int = 0, namespace: str = "ml") -> Obj:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    doc = copy.deepcopy(docs[index])
    doc["metadata"]["namespace"] = namespace
    return doc


def fake_pod(instance: str, kind: str, component: str, index: int, *, exit_code: int, message: str) -> Obj:
    """A finished workload pod as the kubelet would leave it (no kubelet here)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{instance}-{component}-{index}-{uuid.uuid4().hex[:5]}",
            "namespace": "ml",
            "labels": {
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": component,
                "specops.dev/kind": kind,
            },
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"containers": [{"name": "workload", "image": "x"}]},
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "workload",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "message": message,
                            "finishedAt": timestamp(),
                        }
                    },
                }
            ],
        },
    }


def job_done(succeeded: int, **extra: Any) -> Obj:
    """Job status of a finished Indexed Job."""
    now = timestamp()
    return {
        "status": {
            "succeeded": succeeded,
            "active": 0,
            "completedIndexes": f"0-{succeeded - 1}" if succeeded > 1 else "0",
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}],
            **extra,
        }
    }


def job_failed(reason: str, message: str) -> Obj:
    now = timestamp()
    return {
        "status": {
            "active": 0,
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                }
            ],
        }
    }
