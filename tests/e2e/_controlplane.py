"""A real control plane for tests: hack/control-plane/up.sh + down.sh, kubectl/helm, a fake kubelet.

There is no scheduler and no kubelet: pods created by the Job/StatefulSet controllers stay
Pending until `FakeKubelet` patches `pods/status` the way a kubelet would (Running, then
Succeeded/Failed with a terminated container and its termination message). Everything else,
schema validation, defaulting, the status subresource, ownerReference garbage collection, RBAC
and the Job controller's own bookkeeping, is the real thing (Kubernetes v1.20.2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from specops.testing.net import free_port
from specops.testing.poll import until
from specops_operator.builders.common import CONTAINER, INDEX_ANNOTATION
from specops_operator.kube import Kube

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack"
Obj = dict[str, Any]
T = TypeVar("T")


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def tools_dir() -> Path:
    """helm + kubectl from hack/tools.sh (downloaded once into the cache)."""
    out = subprocess.run([HACK / "tools.sh"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


class BuildError(RuntimeError):
    """hack/control-plane/build.sh failed or ran past its time."""


def build_binaries(timeout: float = float(os.environ.get("SPECOPS_BUILD_TIMEOUT", "3600"))) -> None:
    """kube-apiserver + kube-controller-manager; a no-op when cached, ~10 min on 2 cores when not.

    Its output goes straight to the terminal (a cold build must not look like a hang). On timeout
    its whole process group (make, go) is killed, not only the script.
    """
    script = HACK / "control-plane" / "build.sh"
    process = subprocess.Popen([script], stdout=sys.stderr, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise BuildError(f"{script} did not finish in {timeout:.0f}s (SPECOPS_BUILD_TIMEOUT)") from None
    if code != 0:
        raise BuildError(f"{script} failed (exit {code}); its ERROR line above names the step")


@dataclass
class ControlPlane:
    """One running etcd + kube-apiserver + kube-controller-manager (RBAC authorization)."""

    state: Path
    server: str
    admin_token: str
    tools: Path

    @classmethod
    def start(cls, state: Path, tools: Path, owner: int) -> ControlPlane:
        """up.sh --rbac; its watchdog stops everything if process `owner` dies without `stop`."""
        up = [str(HACK / "control-plane" / "up.sh"), "--rbac", "--owner", str(owner), str(state)]
        subprocess.run(up, check=True, stdout=sys.stderr)
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        return cls(state, env["SERVER"], env["ADMIN_TOKEN"], tools)

    def stop(self) -> None:
        subprocess.run([HACK / "control-plane" / "down.sh", str(self.state)], check=False)

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def kubeconfig_for(self, name: str, token: str) -> Path:
        """A kubeconfig like the admin's, authenticating with another bearer token."""
        path = self.state / f"{name}.kubeconfig"
        text = self.kubeconfig.read_text().replace(self.admin_token, token)
        path.write_text(text.replace("specops-admin", name))
        return path

    def kube(self, token: str | None = None) -> Kube:
        return Kube.for_host(self.server, token or self.admin_token, verify_ssl=False)

    def _run(self, tool: str, args: Sequence[str], stdin: str | None, check: bool, kubeconfig: Path | None):
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        result = subprocess.run(
            [str(self.tools / tool), *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self._run("kubectl", args, stdin, check, kubeconfig)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("helm", args, None, check, None)

    def namespace(self, prefix: str = "e2e") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        until(lambda: self.get_json("serviceaccount", "default", "-n", name), what=f"{name}/default SA")
        return name

    def get_json(self, *args: str) -> Obj | None:
        """`kubectl get ARGS -o json`, or None when it is not there (yet)."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def audit(self) -> list[Obj]:
        """Audit events of service-account requests (up.sh logs only those)."""
        path = self.state / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FakeKubelet:
    """Moves pods through phases by patching pods/status, as the kubelet would."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def pods(self, namespace: str, labels: dict[str, str]) -> list[Obj]:
        return self.kube.list("v1", "Pod", namespace, labels)

    def _status(self, pod: Obj, body: Obj) -> Obj:
        meta = pod["metadata"]
        return self.kube.patch("v1", "Pod", meta["namespace"], meta["name"], body, subresource="status")

    def index(self, pod: Obj, index: int) -> None:
        """Stamp the completion index a v1.21+ Job controller would set (v1.20 has no Indexed Jobs)."""
        meta = pod["metadata"]
        if (meta.get("annotations") or {}).get(INDEX_ANNOTATION) is None:
            body = {"metadata": {"annotations": {INDEX_ANNOTATION: str(index)}}}
            self.kube.patch("v1", "Pod", meta["namespace"], meta["name"], body)

    def run(self, pod: Obj) -> Obj:
        started = now()
        return self._status(
            pod,
            {
                "status": {
                    "phase": "Running",
                    "startTime": started,
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": started},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": started},
                    ],
                    "containerStatuses": [
                        {
                            "name": CONTAINER,
                            "ready": True,
                            "restartCount": 0,
                            "image": "specops/workload:e2e",
                            "imageID": "",
                            "state": {"running": {"startedAt": started}},
                        }
                    ],
                }
            },
        )

    def drive(
        self,
        namespace: str,
        labels: dict[str, str],
        done: Callable[[], object],
        report: Callable[[int], Obj] = lambda index: {},
        exit_code: int = 0,
        timeout: float = 45.0,
    ) -> None:
        """Run and end every pod matching `labels` as it appears, until `done()` holds.

        Each new pod gets the next completion index; its container prints `report(index)` as
        the JSON line the report wrapper leaves in the termination message.
        """
        indexes: dict[str, int] = {}

        def step() -> object:
            for pod in self.pods(namespace, labels):
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                name = pod["metadata"]["name"]
                index = indexes.setdefault(name, len(indexes))
                self.index(pod, index)
                self.run(pod)
                self.finish(pod, exit_code, json.dumps(report(index)))
            return done()

        until(step, timeout=timeout, what=f"pods {labels} in {namespace} to finish the work")

    def finish(self, pod: Obj, exit_code: int = 0, message: str = "") -> Obj:
        """The container ended; `message` is what its termination-message file held."""
        ended = now()
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "message": message,
            "startedAt": ended,
            "finishedAt": ended,
        }
        return self._status(
            pod,
            {
                "status": {
                    "phase": "Succeeded" if exit_code == 0 else "Failed",
                    "conditions": [
                        {"type": "Ready", "status": "False", "lastTransitionTime": ended},
                        {"type": "ContainersReady", "status": "False", "lastTransitionTime": ended},
                    ],
                    "containerStatuses": [
                        {
                            "name": CONTAINER,
                            "ready": False,
                            "restartCount": 0,
                            "image": "specops/workload:e2e",
                            "imageID": "",
                            "state": {"terminated": terminated},
                        }
                    ],
                }
            },
        )


@dataclass
class OperatorProcess:
    """`python -m specops_operator run -A` as a child process, like the Deployment runs it."""

    kubeconfig: Path
    log: Path
    refresh: float = 1.0
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self) -> OperatorProcess:
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "SPECOPS_WORKLOAD_IMAGE": "specops/workload:e2e",
            **self.extra_env,
        }
        command = [
            sys.executable,
            "-m",
            "specops_operator",
            "run",
            "--all-namespaces",
            f"--liveness=http://127.0.0.1:{self.port}/healthz",
            f"--refresh-interval={self.refresh}",
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        until(self.healthy, timeout=60, what=f"operator liveness (log {self.log})")
        return self

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"operator exited with {self.process.returncode}: {self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0
