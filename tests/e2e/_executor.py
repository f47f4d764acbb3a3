"""A node agent for the e2e control plane: pods the controllers create really run, as local processes.

What is real: the API server, the Job / StatefulSet / garbage-collection / PV-binding controllers,
and the workload processes themselves — the `specops` commands the operator rendered, run from the
project's virtualenv (the workload image's stand-in) with the pod's env, volumes, working
directory, user and hostname. What the executor does is a kubelet's, scheduler's, provisioner's and
DNS server's job, in simplified form, and each simplification is named here and in
docs/kubernetes.md ("where it is proven"):

- scheduling: `nodeSelector` and resource requests (limits stand for missing requests, as for
  extended resources such as `nvidia.com/gpu`) against the registered Nodes, spreading pods over
  the least busy node; unschedulable pods get `PodScheduled=False/Unschedulable` and an Event, as
  from kube-scheduler. Affinity, taints/tolerations and topology spread are not evaluated.
- volumes: `configMap`, `secret` (files), `persistentVolumeClaim` (a directory per claim, provisioned
  as a hostPath PV for claims of a known storage class, so the real binder binds it; a pod whose
  claim is unbound is unschedulable), `emptyDir` (`medium: Memory` is a tmpfs). A ReadWriteOnce claim
  used by a running pod on another node blocks the pod (a Multi-Attach Event), as the attach/detach
  controller does. Other volume types make the pod fail to start.
- networking: every pod gets its own loopback address 127.0.0.N as `status.podIP`, but all pods
  share the host's network namespace: two pods binding the same port on 0.0.0.0 collide (they
  would not on a node). DNS is an /etc/hosts per pod, rewritten in place as pods and Services
  change: pod hostnames with their subdomain and Services (headless or not) resolve to the
  backing pods' IPs (ready ones, or all with `publishNotReadyAddresses`). There is no kube-proxy:
  a Service is reached on its target port at a pod IP.
- Indexed Jobs: the v1.20 Job controller knows no completion indexes. For pods owned by a Job the
  executor stamps `batch.kubernetes.io/job-completion-index` (the lowest index neither succeeded
  nor held by a live pod: each index runs once, and a failed index is reused by its replacement)
  and uses `<job>-<index>` as the hostname, as the 1.22+ controller does.
- containers: one process tree per container in its own mount, UTS and PID namespaces (see
  _podlaunch.py), as `runAsUser`/`runAsGroup`/`fsGroup` (volumes are group-owned by `fsGroup`), with
  a read-only root when asked. Exit codes and signals become `state.terminated` (137 for SIGKILL);
  the termination message comes from `terminationMessagePath`, or the log tail with
  `FallbackToLogsOnError`. `restartPolicy` Always/OnFailure restarts the container (10 s backoff cap
  not modelled: 1 s). Readiness probes: `tcpSocket` and `exec` are run; none means ready. No
  resource limits are enforced, no image is pulled, and `kubectl logs` does not work (logs are files
  under the executor's state directory: `PodExecutor.log(pod)`).
- deletion: a deleted pod gets SIGTERM, SIGKILL after its grace period, then is removed, as a
  kubelet does; `kill(pod, signal)` signals a container from outside (kill -9 on a node).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from specops_operator.builders.common import INDEX_ANNOTATION
from specops_operator.kube import ApiError, Kube

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
"""The virtualenv running the tests: the image's /opt/venv (in a git worktree it lies outside ROOT)."""
LAUNCHER = Path(__file__).with_name("_podlaunch.py")
IMAGE_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONPATH": f"{ROOT}/workloads:{ROOT}/operator",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "LANG": "C.UTF-8",
}
"""The workload image's environment (Dockerfile `ENV`), with the test run's venv as /opt/venv and
this checkout's packages first on the path (the venv's editable install may point at another one)."""
IMAGE_WORKDIR = "/home/specops"
IMAGE_DIRS = sorted({str(ROOT), str(VENV), sys.base_prefix, str(Path(sys.base_prefix).resolve())})
"""Host directories every container sees read-only at their own paths: the repository with its
virtualenv, and the Python installation the virtualenv points into."""
CLUSTER_DOMAIN = "cluster.local"
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048
"""What a kubelet keeps of the log for FallbackToLogsOnError."""


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in env values, command and args (`$$` escapes a `$`)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(one, text)


@dataclass
class Node:
    name: str
    ip: str
    labels: dict[str, str]
    allocatable: dict[str, str]

    def manifest(self) -> Obj:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self.labels}}

    def status(self) -> Obj:
        stamp = now()
        return {
            "status": {
                "capacity": self.allocatable,
                "allocatable": self.allocatable,
                "addresses": [
                    {"type": "InternalIP", "address": self.ip},
                    {"type": "Hostname", "address": self.name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "specops e2e pod executor",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.20.2-specops-executor",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "specops-executor://1",
                    "kernelVersion": "",
                    "osImage": "",
                    "kubeProxyVersion": "",
                    "bootID": "",
                    "machineID": "",
                    "systemUUID": "",
                },
            }
        }


@dataclass
class Running:
    """One pod on a node: its container process and what the executor prepared for it."""

    uid: str
    namespace: str
    name: str
    node: Node
    ip: str
    hostname: str
    state: Path
    spec: Obj
    process: subprocess.Popen[bytes] | None = None
    started: str = ""
    restarts: int = 0
    ready: bool = False
    finished: bool = False
    deleting_since: float | None = None
    claims: tuple[str, ...] = ()
    restart_at: float | None = None
    last_terminated: Obj | None = None
    exits: list[int] = field(default_factory=list)

    @property
    def container(self) -> Obj:
        return dict(self.spec["containers"][0])

    @property
    def log(self) -> Path:
        return self.state / "container.log"

    @property
    def termination(self) -> Path:
        return self.state / "termination-log"


class PodExecutor:
    """Schedules, runs and reports the pods of the namespaces it is told to watch."""

    def __init__(
        self,
        kube: Kube,
        state: Path,
        *,
        nodes: int = 2,
        gpus_per_node: int = 8,
        storage_classes: Iterable[str] = ("", "e2e-rwx"),
        interval: float = 0.25,
    ) -> None:
        self.kube = kube
        self.state = state
        self.interval = interval
        self.storage_classes = set(storage_classes)
        self.namespaces: set[str] = set()
        self.nodes = [
            Node(
                name=f"e2e-node-{i}",
                ip=f"127.0.1.{i + 1}",
                labels={"kubernetes.io/hostname": f"e2e-node-{i}", "kubernetes.io/os": "linux"},
                allocatable={
                    "cpu": "16",
                    "memory": "128Gi",
                    "pods": "110",
                    "nvidia.com/gpu": str(gpus_per_node),
                    "ephemeral-storage": "500Gi",
                },
            )
            for i in range(nodes)
        ]
        self.pods: dict[str, Running] = {}
        self.next_ip = 2
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PodExecutor:
        for node in self.nodes:
            try:
                self.raw("POST", "/api/v1/nodes", node.manifest())
            except ApiError as exc:
                if exc.status != 409:
                    raise
            self.raw("PATCH", f"/api/v1/nodes/{node.name}/status", node.status(), merge=True)
        self._thread = threading.Thread(target=self._loop, name="pod-executor", daemon=True)
        self._thread.start()
        return self

    def watch(self, namespace: str) -> None:
        self.namespaces.add(namespace)

    def release(self, namespace: str) -> None:
        """Stop running the namespace's pods and kill its containers (as deleting the namespace
        would): pods share the host's network, so a broker left running would answer for the
        next test's broker on the same port."""
        with self._lock:
            self.namespaces.discard(namespace)
            for uid in [uid for uid, r in self.pods.items() if r.namespace == namespace]:
                self._forget(self.pods.pop(uid))

    def stop(self) -> None:
        """Kill every container and stop the loop (idempotent: the control plane stops right after)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for pod in list(self.pods.values()):
            self._signal(pod, signal.SIGKILL)
            if pod.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.process.wait(timeout=10)

    def raw(self, method: str, path: str, body: Any = None, merge: bool = False) -> Obj:
        content = "application/merge-patch+json" if merge else "application/json"
        return self.kube._call(method, path, body, content_type=content)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the agent alive; tests read self.errors
                self.errors.append(traceback.format_exc())
            self._stop.wait(self.interval)

    # ------------------------------------------------------------------ one pass

    def tick(self) -> None:
        with self._lock:
            for namespace in sorted(self.namespaces):
                self._provision(namespace)
                pods = self.raw("GET", f"/api/v1/namespaces/{namespace}/pods").get("items") or []
                services = self.raw("GET", f"/api/v1/namespaces/{namespace}/services").get("items") or []
                alive = {p["metadata"]["uid"] for p in pods}
                for pod in pods:
                    self._step(pod)
                for uid in [
                    uid for uid, r in self.pods.items() if r.namespace == namespace and uid not in alive
                ]:
                    self._forget(self.pods.pop(uid))
                self._probe(namespace)
                self._write_hosts(namespace, services, pods)

    def _step(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        running = self.pods.get(uid)
        if meta.get("deletionTimestamp"):
            self._delete(pod, running)
            return
        phase = (pod.get("status") or {}).get("phase")
        if running is None:
            if phase in ("Succeeded", "Failed"):
                return
            node = self._node(spec.get("nodeName")) if spec.get("nodeName") else self._schedule(pod)
            if node is None:
                return
            running = self._admit(pod, node)
            if running is None:
                return
        if running.finished:
            return
        if running.process is None:
            if running.restart_at is not None and time.monotonic() < running.restart_at:
                return
            self._start(pod, running)
            return
        if running.process.poll() is not None:
            self._exited(running, self._exit_code(running))

    # ------------------------------------------------------------------ scheduling

    def _node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def _requests(self, spec: Obj) -> dict[str, float]:
        total: dict[str, float] = {}
        for container in spec.get("containers") or []:
            resources = container.get("resources") or {}
            wanted = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
            for key, value in wanted.items():
                total[key] = total.get(key, 0.0) + quantity(value)
        return total

    def _schedule(self, pod: Obj) -> Node | None:
        """kube-scheduler's part: filter nodes, pick the least busy, bind (or report Unschedulable)."""
        meta, spec = pod["metadata"], pod["spec"]
        reasons: list[str] = []
        unbound = self._unbound_claims(meta["namespace"], spec)
        if unbound:
            self._unschedulable(
                pod,
                f"0/{len(self.nodes)} nodes are available: pod has unbound immediate PersistentVolumeClaims ({', '.join(unbound)}).",
            )
            return None
        wanted = self._requests(spec)
        fits: list[Node] = []
        for node in self.nodes:
            selector = spec.get("nodeSelector") or {}
            if any(node.labels.get(k) != v for k, v in selector.items()):
                reasons.append("node(s) didn't match node selector")
                continue
            used = self._used(node)
            short = [
                key
                for key, amount in wanted.items()
                if amount + used.get(key, 0.0) > quantity(node.allocatable.get(key, "0"))
            ]
            if short:
                reasons.append(f"Insufficient {short[0]}")
                continue
            fits.append(node)
        if not fits:
            counts: dict[str, int] = {}
            for reason in reasons:
                counts[reason] = counts.get(reason, 0) + 1
            text = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
            self._unschedulable(pod, f"0/{len(self.nodes)} nodes are available: {text}.")
            return None
        node = min(fits, key=lambda n: sum(1 for r in self.pods.values() if r.node is n and not r.finished))
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
        }
        try:
            self.raw("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", binding)
        except ApiError as exc:
            if exc.status in (404, 409):
                return None
            raise
        self._event(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {meta['namespace']}/{meta['name']} to {node.name}",
            "default-scheduler",
        )
        return node

    def _used(self, node: Node) -> dict[str, float]:
        used: dict[str, float] = {}
        for running in self.pods.values():
            if running.node is node and not running.finished:
                for key, amount in self._requests(running.spec).items():
                    used[key] = used.get(key, 0.0) + amount
        return used

    def _unschedulable(self, pod: Obj, message: str) -> None:
        meta = pod["metadata"]
        key = (meta["uid"], message)
        if key in self._reported:
            return
        self._reported.add(key)
        self._patch_status(pod, {"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastTransitionTime": now()}
        ]}})  # fmt: skip
        self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")

    # ------------------------------------------------------------------ storage

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.state / "volumes" / namespace / claim

    def _provision(self, namespace: str) -> None:
        """A provisioner for claims of a known class: a hostPath PV pre-bound to the claim."""
        claims = self.raw("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims").get("items") or []
        for claim in claims:
            meta, spec = claim["metadata"], claim["spec"]
            if (claim.get("status") or {}).get("phase") == "Bound" or spec.get("volumeName"):
                continue
            klass = spec.get("storageClassName") or ""
            if klass not in self.storage_classes:
                key = (meta["uid"], "class")
                if key not in self._reported:
                    self._reported.add(key)
                    self._event(
                        claim,
                        "Warning",
                        "ProvisioningFailed",
                        f'storageclass.storage.k8s.io "{klass}" not found',
                        "persistentvolume-controller",
                        kind="PersistentVolumeClaim",
                    )
                continue
            directory = self.claim_dir(namespace, meta["name"])
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, 0, 1000)
            directory.chmod(0o2775)
            name = f"pv-{meta['uid']}"
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name, "labels": {"specops.dev/e2e": "true"}},
                "spec": {
                    "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": klass,
                    "hostPath": {"path": str(directory)},
                    "claimRef": {"namespace": namespace, "name": meta["name"], "uid": meta["uid"]},
                },
            }
            try:
                self.raw("POST", "/api/v1/persistentvolumes", volume)
            except ApiError as exc:
                if exc.status != 409:
                    raise

    def _claims(self, spec: Obj) -> list[str]:
        return [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes") or []
            if "persistentVolumeClaim" in v
        ]

    def _unbound_claims(self, namespace: str, spec: Obj) -> list[str]:
        out = []
        for claim in self._claims(spec):
            try:
                obj = self.raw("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                out.append(claim)
                continue
            if (obj.get("status") or {}).get("phase") != "Bound":
                out.append(claim)
        return out

    def _multi_attach(self, namespace: str, spec: Obj, node: Node) -> str | None:
        """A ReadWriteOnce claim already attached to another node (the attach/detach controller's error)."""
        for claim in self._claims(spec):
            obj = self.raw("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            modes = (obj.get("status") or {}).get("accessModes") or obj["spec"].get("accessModes") or []
            if "ReadWriteOnce" not in modes or "ReadWriteMany" in modes:
                continue
            users = [
                r
                for r in self.pods.values()
                if r.namespace == namespace and claim in r.claims and r.node is not node and not r.finished
            ]
            if users:
                return f'Multi-Attach error for volume "{claim}" Volume is already used by pod(s) {", ".join(u.name for u in users)}'
        return None

    # ------------------------------------------------------------------ admit and start

    def _job_index(self, pod: Obj) -> int | None:
        """The completion index a 1.22+ Job controller would have given this pod (None: not a Job pod)."""
        meta = pod["metadata"]
        annotated = (meta.get("annotations") or {}).get(INDEX_ANNOTATION)
        if annotated is not None:
            return int(annotated)
        owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == "Job"), None)
        if owner is None:
            return None
        namespace = meta["namespace"]
        job = self.raw("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{owner['name']}")
        completions = int(job["spec"].get("completions") or 1)
        siblings = self.raw("GET", f"/api/v1/namespaces/{namespace}/pods").get("items") or []
        taken: set[int] = set()
        for other in siblings:
            refs = other["metadata"].get("ownerReferences") or []
            if other["metadata"]["uid"] == meta["uid"] or not any(r.get("uid") == owner["uid"] for r in refs):
                continue
            value = (other["metadata"].get("annotations") or {}).get(INDEX_ANNOTATION)
            if value is None:
                continue
            phase = (other.get("status") or {}).get("phase")
            if phase == "Failed" or other["metadata"].get("deletionTimestamp"):
                continue  # a failed index is free for the replacement
            taken.add(int(value))
        free = [i for i in range(completions) if i not in taken]
        if not free:
            return None  # more pods than indexes: the 1.22 controller would not have made this one
        index = free[0]
        self.kube.patch(
            "v1",
            "Pod",
            namespace,
            meta["name"],
            {"metadata": {"annotations": {INDEX_ANNOTATION: str(index)}}},
        )
        meta.setdefault("annotations", {})[INDEX_ANNOTATION] = str(index)
        return index

    def _admit(self, pod: Obj, node: Node) -> Running | None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace = meta["namespace"]
        problem = self._multi_attach(namespace, spec, node)
        if problem:
            key = (meta["uid"], "attach")
            if key not in self._reported:
                self._reported.add(key)
                self._event(pod, "Warning", "FailedAttachVolume", problem, "attachdetach-controller")
            return None
        hostname = spec.get("hostname")
        owner_job = next(
            (r["name"] for r in meta.get("ownerReferences") or [] if r.get("kind") == "Job"), None
        )
        if owner_job is not None:
            index = self._job_index(pod)
            if index is None:
                return None
            hostname = hostname or f"{owner_job}-{index}"
        state = self.state / "pods" / namespace / f"{meta['name']}-{meta['uid'][:8]}"
        state.mkdir(parents=True, exist_ok=True)
        running = Running(
            uid=meta["uid"],
            namespace=namespace,
            name=meta["name"],
            node=node,
            ip=self._allocate_ip(),
            hostname=(hostname or meta["name"])[:63],
            state=state,
            spec=spec,
            claims=tuple(self._claims(spec)),
        )
        self.pods[running.uid] = running
        return running

    def _allocate_ip(self) -> str:
        n = self.next_ip
        self.next_ip += 1
        return f"127.0.{2 + n // 250}.{2 + n % 250}"

    def _env(self, pod: Obj, running: Running) -> dict[str, str]:
        meta = pod["metadata"]
        container = running.container
        env: dict[str, str] = dict(IMAGE_ENV)
        env["HOSTNAME"] = running.hostname
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self._config_data(
                    meta["namespace"],
                    source["configMapRef"]["name"],
                    "ConfigMap",
                    source["configMapRef"].get("optional"),
                )
            else:
                data = self._config_data(
                    meta["namespace"],
                    source["secretRef"]["name"],
                    "Secret",
                    source["secretRef"].get("optional"),
                )
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = expand(str(item["value"]), env)
            elif "valueFrom" in item:
                value = self._value_from(pod, running, item["valueFrom"])
                if value is not None:
                    env[item["name"]] = value
            else:
                env[item["name"]] = ""
        return env

    def _value_from(self, pod: Obj, running: Running, source: Obj) -> str | None:
        meta = pod["metadata"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            simple = {
                "metadata.name": meta["name"],
                "metadata.namespace": meta["namespace"],
                "metadata.uid": meta["uid"],
                "spec.nodeName": running.node.name,
                "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                "status.podIP": running.ip,
                "status.hostIP": running.node.ip,
            }
            if path in simple:
                return simple[path]
            match = re.match(r"^metadata\.(annotations|labels)\['([^']+)'\]$", path)
            if match:
                return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
            raise ValueError(f"fieldRef {path!r} is not supported by the e2e executor")
        for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if key in source:
                ref = source[key]
                data = self._config_data(meta["namespace"], ref["name"], kind, ref.get("optional"))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ValueError(
                        f"couldn't find key {ref['key']} in {kind} {meta['namespace']}/{ref['name']}"
                    )
                return data[ref["key"]]
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            limits = (running.container.get("resources") or {}).get(ref["resource"].split(".")[0]) or {}
            return str(limits.get(ref["resource"].split(".", 1)[1], "0"))
        raise ValueError(f"valueFrom {sorted(source)} is not supported by the e2e executor")

    def _config_data(self, namespace: str, name: str, kind: str, optional: bool | None) -> dict[str, str]:
        plural = "configmaps" if kind == "ConfigMap" else "secrets"
        try:
            obj = self.raw("GET", f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as exc:
            if exc.status == 404 and optional:
                return {}
            if exc.status == 404:
                raise ValueError(f'{kind.lower()} "{name}" not found') from None
            raise
        data = obj.get("data") or {}
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def _volumes(self, pod: Obj, running: Running) -> list[Obj]:
        """Mount instructions for the launcher: sources prepared on the host, targets in the container."""
        meta, spec = pod["metadata"], pod["spec"]
        namespace = meta["namespace"]
        security = spec.get("securityContext") or {}
        fs_group = security.get("fsGroup")
        sources: dict[str, Obj] = {}
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            directory = running.state / "volumes" / name
            if "emptyDir" in volume:
                if (volume["emptyDir"] or {}).get("medium") == "Memory":
                    sources[name] = {
                        "kind": "tmpfs",
                        "size": str(volume["emptyDir"].get("sizeLimit") or "64Mi").replace("i", ""),
                    }
                    continue
                directory.mkdir(parents=True, exist_ok=True)
                self._own(directory, fs_group)
                sources[name] = {"kind": "bind", "source": str(directory)}
            elif "configMap" in volume or "secret" in volume:
                kind = "ConfigMap" if "configMap" in volume else "Secret"
                ref = volume.get("configMap") or volume.get("secret") or {}
                ref_name = ref.get("name") or ref.get("secretName")
                data = self._config_data(namespace, ref_name, kind, ref.get("optional"))
                directory.mkdir(parents=True, exist_ok=True)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = directory / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    target.chmod(0o644)
                sources[name] = {"kind": "bind", "source": str(directory), "readOnly": True}
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                directory = self.claim_dir(namespace, claim["claimName"])
                directory.mkdir(parents=True, exist_ok=True)
                sources[name] = {
                    "kind": "bind",
                    "source": str(directory),
                    "readOnly": bool(claim.get("readOnly")),
                }
            else:
                raise ValueError(
                    f"volume {name!r}: type {sorted(set(volume) - {'name'})} is not supported by the e2e executor"
                )
        mounts = []
        for item in running.container.get("volumeMounts") or []:
            source = dict(sources[item["name"]])
            if item.get("subPath"):
                source["source"] = str(Path(source["source"]) / item["subPath"])
            source["target"] = item["mountPath"]
            source["readOnly"] = bool(item.get("readOnly")) or bool(source.get("readOnly"))
            mounts.append(source)
        return mounts

    @staticmethod
    def _own(directory: Path, fs_group: int | None) -> None:
        if fs_group is not None:
            os.chown(directory, 0, int(fs_group))
            directory.chmod(0o2775)
        else:
            directory.chmod(0o777)

    def _start(self, pod: Obj, running: Running) -> None:
        spec = pod["spec"]
        container = running.container
        try:
            env = self._env(pod, running)
            mounts = self._volumes(pod, running)
        except ValueError as exc:
            self._event(pod, "Warning", "Failed", f"Error: {exc}", "kubelet")
            self._patch_status(pod, self._waiting(running, "CreateContainerConfigError", str(exc)))
            running.restart_at = time.monotonic() + 2  # the kubelet retries: a missing Secret may appear
            return
        pod_security = spec.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        uid = int(security.get("runAsUser", 0))
        gid = int(security.get("runAsGroup", uid and 1000))
        groups = sorted(
            {
                gid,
                *([int(pod_security["fsGroup"])] if "fsGroup" in pod_security else []),
                *map(int, pod_security.get("supplementalGroups") or []),
            }
        )
        if security.get("runAsNonRoot") and uid == 0:
            message = "container has runAsNonRoot and image will run as root"
            self._patch_status(pod, self._waiting(running, "CreateContainerConfigError", message))
            running.finished = True
            return
        argv = [
            expand(a, env)
            for a in [*(container.get("command") or ["specops"]), *(container.get("args") or [])]
        ]
        upper, work = running.state / "etc-upper", running.state / "etc-work"
        for path in (upper, work, running.state / "root"):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        running.termination.write_text("")
        (running.state / "exit.json").unlink(missing_ok=True)
        running.termination.chmod(0o666)
        plan = {
            "root": str(running.state / "root"),
            "etc_upper": str(upper),
            "etc_work": str(work),
            "hosts": str(running.state / "hosts"),
            "hostname": running.hostname,
            "image_dirs": IMAGE_DIRS,
            "mounts": mounts,
            "termination": str(running.termination),
            "exit": str(running.state / "exit.json"),
            "termination_path": container.get("terminationMessagePath", "/dev/termination-log"),
            "read_only_root": bool(security.get("readOnlyRootFilesystem")),
            "uid": uid,
            "gid": gid,
            "groups": groups,
            "workdir": container.get("workingDir") or IMAGE_WORKDIR,
            "env": env,
            "argv": argv,
        }
        if not (running.state / "hosts").exists():
            (running.state / "hosts").write_text("127.0.0.1 localhost\n")
        (running.state / "plan.json").write_text(json.dumps(plan, indent=1))
        with running.log.open("ab") as log:
            log.write(f"--- {now()} start {' '.join(argv)}\n".encode())
            log.flush()
            running.process = subprocess.Popen(
                [sys.executable, str(LAUNCHER), str(running.state / "plan.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        running.started = now()
        running.ready = "readinessProbe" not in container
        self._patch_status(pod, self._running_status(running))
        if running.restarts == 0:
            self._event(pod, "Normal", "Started", "Started container " + container["name"], "kubelet")

    # ------------------------------------------------------------------ status

    def _base_status(self, running: Running, ready: bool) -> Obj:
        stamp = now()
        return {
            "hostIP": running.node.ip,
            "podIP": running.ip,
            "podIPs": [{"ip": running.ip}],
            "startTime": running.started or stamp,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": stamp},
                {"type": "Ready", "status": str(ready), "lastTransitionTime": stamp},
            ],
        }

    def _container_status(self, running: Running, state: Obj, ready: bool) -> Obj:
        status = {
            "name": running.container["name"],
            "ready": ready,
            "started": "running" in state,
            "restartCount": running.restarts,
            "image": running.container.get("image", ""),
            "imageID": "",
            "containerID": f"specops-executor://{running.uid}-{running.restarts}",
            "state": state,
        }
        if running.last_terminated:
            status["lastState"] = {"terminated": running.last_terminated}
        return status

    def _running_status(self, running: Running) -> Obj:
        state = {"running": {"startedAt": running.started}}
        return {
            "status": {
                "phase": "Running",
                **self._base_status(running, running.ready),
                "containerStatuses": [self._container_status(running, state, running.ready)],
            }
        }

    def _waiting(self, running: Running, reason: str, message: str) -> Obj:
        state = {"waiting": {"reason": reason, "message": message}}
        return {
            "status": {
                "phase": "Pending",
                **self._base_status(running, False),
                "containerStatuses": [self._container_status(running, state, False)],
            }
        }

    def _terminated(self, running: Running, code: int) -> Obj:
        """`state.terminated` as a kubelet writes it: 128+signal for signals, message per policy."""
        exit_code = code if code >= 0 else 128 - code
        message = (
            running.termination.read_text(errors="replace")[:4096] if running.termination.exists() else ""
        )
        policy = running.container.get("terminationMessagePolicy", "File")
        if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
            lines = running.log.read_bytes().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            message = "\n".join(lines)[-LOG_TAIL_BYTES:]
        reason = "Completed" if exit_code == 0 else "Error"
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": running.started,
            "finishedAt": now(),
            "containerID": f"specops-executor://{running.uid}-{running.restarts}",
        }
        if code < 0:
            terminated["signal"] = -code
        if message:
            terminated["message"] = message
        return terminated

    def _exited(self, running: Running, code: int) -> None:
        terminated = self._terminated(running, code)
        running.exits.append(terminated["exitCode"])
        running.process = None
        policy = running.spec.get("restartPolicy", "Always")
        restart = policy == "Always" or (policy == "OnFailure" and terminated["exitCode"] != 0)
        pod = {"metadata": {"namespace": running.namespace, "name": running.name, "uid": running.uid}}
        if restart and running.deleting_since is None:
            running.last_terminated = terminated
            running.restarts += 1
            running.restart_at = time.monotonic() + 1.0
            state = {
                "waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}
            }
            self._patch_status(
                pod,
                {
                    "status": {
                        "phase": "Running",
                        **self._base_status(running, False),
                        "containerStatuses": [self._container_status(running, state, False)],
                    }
                },
            )
            return
        running.finished = True
        phase = "Succeeded" if terminated["exitCode"] == 0 else "Failed"
        self._patch_status(
            pod,
            {
                "status": {
                    "phase": phase,
                    **self._base_status(running, False),
                    "containerStatuses": [self._container_status(running, {"terminated": terminated}, False)],
                }
            },
        )

    @staticmethod
    def _exit_code(running: Running) -> int:
        """The container's exit code, negative for a signal (the launcher's record, else its own code)."""
        try:
            return int(json.loads((running.state / "exit.json").read_text())["code"])
        except (OSError, ValueError, KeyError):
            assert running.process is not None
            return int(running.process.returncode)

    def _probe(self, namespace: str) -> None:
        for running in self.pods.values():
            if running.namespace != namespace or running.process is None or running.finished:
                continue
            probe = running.container.get("readinessProbe")
            if not probe:
                continue
            ready = self._check(running, probe)
            if ready != running.ready:
                running.ready = ready
                pod = {"metadata": {"namespace": running.namespace, "name": running.name, "uid": running.uid}}
                self._patch_status(pod, self._running_status(running))

    def _check(self, running: Running, probe: Obj) -> bool:
        if "tcpSocket" in probe:
            port = probe["tcpSocket"]["port"]
            if isinstance(port, str):
                port = next(
                    (
                        p["containerPort"]
                        for p in running.container.get("ports") or []
                        if p.get("name") == port
                    ),
                    None,
                )
                if port is None:
                    return False
            try:
                with socket.create_connection((running.ip, int(port)), timeout=0.5):
                    return True
            except OSError:
                return False
        if "exec" in probe:
            pid = self._main_pid(running)
            if pid is None:
                return False
            result = subprocess.run(
                ["nsenter", "-t", str(pid), "-m", "-p", "--", *probe["exec"]["command"]],
                capture_output=True,
                timeout=10,
            )
            return result.returncode == 0
        raise ValueError(f"readiness probe {sorted(probe)} is not supported by the e2e executor")

    # ------------------------------------------------------------------ DNS

    def _write_hosts(self, namespace: str, services: list[Obj], pods: list[Obj]) -> None:
        """Each pod's /etc/hosts: its own name, pods by hostname.subdomain, Services by their backends."""
        lines = ["127.0.0.1 localhost"]
        mine = [r for r in self.pods.values() if r.namespace == namespace and not r.finished]
        domain = f"{namespace}.svc.{CLUSTER_DOMAIN}"
        for running in mine:
            subdomain = running.spec.get("subdomain")
            if subdomain:
                base = f"{running.hostname}.{subdomain}"
                lines.append(f"{running.ip} {base}.{domain} {base}.{namespace}.svc {base}.{namespace} {base}")
        for service in services:
            selector = (service.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            public = bool(service["spec"].get("publishNotReadyAddresses"))
            name = service["metadata"]["name"]
            for pod in pods:
                labels = pod["metadata"].get("labels") or {}
                running = self.pods.get(pod["metadata"]["uid"])
                if (
                    running is None
                    or running.finished
                    or any(labels.get(k) != v for k, v in selector.items())
                ):
                    continue
                if running.ready or public:
                    lines.append(
                        f"{running.ip} {name}.{domain} {name}.{namespace}.svc {name}.{namespace} {name}"
                    )
        for running in mine:
            own = f"{running.ip} {running.hostname}\n"
            text = own + "\n".join(lines) + "\n"
            path = running.state / "hosts"
            if path.exists() and path.read_text() == text:
                continue
            # In place: the container's /etc/hosts is a bind mount of this very inode.
            with path.open("a+") as handle:
                handle.seek(0)
                handle.truncate()
                handle.write(text)

    # ------------------------------------------------------------------ deletion and signals

    def _main_pid(self, running: Running) -> int | None:
        """Host PID of the container's command (PID 1 of its namespace): the child of `unshare`."""
        if running.process is None:
            return None
        try:
            children = (
                Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children").read_text().split()
            )
        except OSError:
            return None
        return int(children[0]) if children else None

    def _signal(self, running: Running, sig: int) -> None:
        pid = self._main_pid(running)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal a running pod's container from outside, as `kill` on its node would; returns the PID."""
        with self._lock:
            running = next(
                (r for r in self.pods.values() if r.namespace == namespace and r.name == name and r.process),
                None,
            )
            if running is None:
                raise AssertionError(f"pod {namespace}/{name} is not running here")
            pid = self._main_pid(running)
            if pid is None:
                raise AssertionError(f"pod {namespace}/{name}: no container process yet")
            os.kill(pid, sig)
            return pid

    def _delete(self, pod: Obj, running: Running | None) -> None:
        meta = pod["metadata"]
        if running is not None and running.process is not None:
            if running.deleting_since is None:
                running.deleting_since = time.monotonic()
                self._signal(running, signal.SIGTERM)
            grace = float(
                meta.get("deletionGracePeriodSeconds")
                or pod["spec"].get("terminationGracePeriodSeconds")
                or 30
            )
            code = running.process.poll()
            if code is None and time.monotonic() - running.deleting_since > grace:
                self._signal(running, signal.SIGKILL)
                return
            if code is None:
                return
            self._exited(running, self._exit_code(running))
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.raw("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def _forget(self, running: Running) -> None:
        if running.process is not None and running.process.poll() is None:
            self._signal(running, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                running.process.wait(timeout=10)

    # ------------------------------------------------------------------ API helpers

    def _patch_status(self, pod: Obj, body: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.kube.patch("v1", "Pod", meta["namespace"], meta["name"], body, subresource="status")
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def _event(
        self, obj: Obj, type_: str, reason: str, message: str, component: str, kind: str = "Pod"
    ) -> None:
        meta = obj["metadata"]
        stamp = now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": component},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        with contextlib.suppress(ApiError):
            self.raw("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)

    # ------------------------------------------------------------------ for tests

    def pod_logs(self, namespace: str, prefix: str) -> dict[str, str]:
        """Pod directory name -> its container log, for the pods named `prefix...`."""
        paths = sorted((self.state / "pods" / namespace).glob(f"{prefix}*/container.log"))
        return {p.parent.name: p.read_text(errors="replace") for p in paths}

    def log(self, namespace: str, prefix: str) -> str:
        """Everything the containers of pods named `prefix...` printed, across restarts."""
        paths = sorted((self.state / "pods" / namespace).glob(f"{prefix}*/container.log"))
        return "\n".join(p.read_text(errors="replace") for p in paths)

    def logs(self, namespace: str) -> str:
        """Every container log of the namespace, each headed by its pod: what a failing test prints."""
        out = []
        for path in sorted((self.state / "pods" / namespace).glob("*/container.log")):
            out.append(f"===== {path.parent.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(out)

    def exit_codes(self, namespace: str, prefix: str) -> list[int]:
        return [
            code
            for r in self.pods.values()
            if r.namespace == namespace and r.name.startswith(prefix)
            for code in r.exits
        ]
