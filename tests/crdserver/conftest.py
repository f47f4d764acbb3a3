"""The modern CRD server tier: apiextensions-apiserver 0.36 + etcd 3.5 (built at collection), crds/
applied server-side, stopped after the last test of the tier."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server import (
    CRD_API,
    ROOT,
    BuildError,
    Client,
    CrdServer,
    build_binaries,
    condition,
    crd_manifests,
)

from specops.testing.poll import until

# The bad-CR tables live with the unit tests (tests/unit/test_operator_examples.py); this tier
# replays them against the real server.
sys.path.insert(0, str(ROOT / "tests" / "unit"))

BIN = pytest.StashKey[Path]()
LAST = pytest.StashKey[str]()
RUNNING = pytest.StashKey[list[CrdServer]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the server (once, cached) when tests of this tier were selected.

    Here rather than in a fixture: a cold build (~10 min) must not count against pytest-timeout's
    per-test limit, and a failed one stops the run with one clear line.
    """
    selected = [item for item in session.items if item.get_closest_marker("crdserver")]
    if not selected:
        return
    session.config.stash[LAST] = selected[-1].nodeid
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            session.config.stash[BIN] = build_binaries()
        except BuildError as exc:
            pytest.exit(f"crdserver: {exc}", returncode=pytest.ExitCode.INTERNAL_ERROR)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the server after the tier's last test, not when all of `make test` ends."""
    if item.nodeid == item.config.stash.get(LAST, None):
        for server in item.config.stash.get(RUNNING, []):
            server.stop()


@pytest.fixture(scope="session")
def crd_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrdServer]:
    """etcd + apiextensions-apiserver with every CRD of crds/ applied server-side and Established."""
    bin_dir = request.config.stash.get(BIN, None)
    if bin_dir is None:  # collected without the marker (e.g. -p no:...): build now
        bin_dir = build_binaries()
    server = CrdServer.start(tmp_path_factory.mktemp("crd-server"), bin_dir, owner=os.getpid())
    request.config.stash.setdefault(RUNNING, []).append(server)
    try:
        client = server.client()
        for crd in crd_manifests():
            client.apply(crd, CRD_API)
            assert client.warnings == [], f"{crd['metadata']['name']}: {client.warnings}"
        for crd in crd_manifests():
            name = crd["metadata"]["name"]
            until(
                lambda name=name: condition(client.crd(name), "Established").get("status") == "True",
                timeout=30,
                what=f"{name} Established",
            )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(crd_server: CrdServer) -> Client:
    return crd_server.client()


@pytest.fixture
def ns() -> str:
    """A fresh namespace name (this server has no Namespace objects: any name is usable)."""
    return f"t-{uuid.uuid4().hex[:6]}"
