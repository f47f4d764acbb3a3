"""The e2e session: a real control plane (built at collection), our CRDs applied, stopped after the last e2e test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
from _controlplane import (
    ROOT,
    BuildError,
    ControlPlane,
    FakeKubelet,
    OperatorProcess,
    build_binaries,
    tools_dir,
)
from _executor import PodExecutor

LAST_E2E = pytest.StashKey[str]()
RUNNING = pytest.StashKey[list[ControlPlane | PodExecutor]]()


def pytest_configure(config: pytest.Config) -> None:
    # The control plane serves a self-signed certificate on loopback; clients skip verification.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control plane (once, cached) when e2e tests were selected.

    Here rather than in a fixture: a cold build (~10 min) must not count against pytest-timeout's
    per-test limit, and a failed one stops the run with one clear line.
    """
    selected = [item for item in session.items if item.get_closest_marker("e2e")]
    if not selected:
        return
    session.config.stash[LAST_E2E] = selected[-1].nodeid
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            build_binaries()
        except BuildError as exc:
            pytest.exit(f"e2e: {exc}", returncode=pytest.ExitCode.INTERNAL_ERROR)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Stop the control plane after the last e2e test, not when all of `make test` ends."""
    if item.nodeid == item.config.stash.get(LAST_E2E, None):
        for running in reversed(item.config.stash.get(RUNNING, [])):  # executors before their plane
            running.stop()


def exclusive_lock(path: Path) -> TextIO:
    """Wait for an exclusive flock on `path`; closing the returned handle releases it."""
    handle = path.open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@pytest.fixture(scope="session")
def tools() -> Path:
    """The helm/kubectl directory (hack/tools.sh); the control plane was built at collection."""
    return tools_dir()


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tools: Path
) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver (RBAC) + kube-controller-manager, with crds/ applied and established.

    One e2e session per machine at a time (an exclusive lock, waited for): pods of two executors would
    share loopback addresses and the broker's host ports.
    """
    lock = exclusive_lock(Path(os.environ.get("SPECOPS_E2E_LOCK", "/tmp/specops-e2e.lock")))
    request.addfinalizer(lock.close)
    state = tmp_path_factory.mktemp("control-plane")
    plane = ControlPlane.start(state, tools, owner=os.getpid())
    request.config.stash.setdefault(RUNNING, []).append(plane)
    try:
        # --validate=false: kubectl checks a CRD against the server's own CRD schema, and v1.20's
        # does not know x-kubernetes-validations (the server then drops those CEL rules).
        plane.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(ROOT / "crds"))
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def ns(control_plane: ControlPlane) -> str:
    """A fresh namespace per test (its default ServiceAccount already created)."""
    return control_plane.namespace()


@pytest.fixture
def kubelet(control_plane: ControlPlane) -> FakeKubelet:
    return FakeKubelet(control_plane.kube())


@pytest.fixture
def operator_log(tmp_path: Path) -> Path:
    return tmp_path / "operator.log"


@pytest.fixture
def operator(control_plane: ControlPlane, operator_log: Path) -> Iterator[OperatorProcess]:
    """The operator as a child process with admin credentials, watching every namespace."""
    running = OperatorProcess(control_plane.kubeconfig, operator_log).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def executor(
    request: pytest.FixtureRequest, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodExecutor]:
    """Two Nodes whose pods really run (tests/e2e/_executor.py); it acts only in namespaces it watches."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("the pod executor needs root (unshare(2) namespaces) and mount(8) for pod volumes")
    running = PodExecutor(control_plane.kube(), tmp_path_factory.mktemp("executor")).start()
    request.config.stash.setdefault(RUNNING, []).append(running)
    try:
        yield running
    finally:
        running.stop()
        assert not running.errors, "pod executor errors:\n" + "\n".join(running.errors[-3:])


@pytest.fixture
def pods_ns(
    control_plane: ControlPlane, executor: PodExecutor, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace whose pods run; their logs are printed when the test fails."""
    name = control_plane.namespace("run")
    executor.watch(name)
    yield name
    executor.release(name)
    if request.node.stash.get(FAILED, None):
        print(executor.logs(name)[-30000:])


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report
