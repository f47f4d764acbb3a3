"""The pod executor itself: pod specs run as a node would run them (env, volumes, DNS, users, exits).

These pin down the emulation the workload scenarios (test_pods_run.py) rely on, with plain Python
commands, so a broken executor fails here with a clear cause rather than inside a training run.
"""

from __future__ import annotations

import json
import signal
import textwrap
from typing import Any

import pytest
from _controlplane import ControlPlane, until
from _executor import PodExecutor

from specops_operator.builders.common import INDEX_ANNOTATION

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]

PROBE = textwrap.dedent(
    """
    import json, os, socket, sys
    index = os.environ["INDEX"]
    out = {
        "index": index,
        "pod": os.environ["POD_NAME"],
        "ip": os.environ["POD_IP"],
        "token": os.environ["TOKEN"],
        "greeting": open("/etc/config/greeting").read(),
        "hostname": socket.gethostname(),
        "peer": socket.gethostbyname(os.environ["PEER"]),
        "uid": os.getuid(),
        "groups": sorted(os.getgroups()),
        "home": os.environ["HOME"],
        "cwd": os.getcwd(),
        "args": sys.argv[1:],
    }
    try:
        open("/root-is-writable", "w")
        out["root_writable"] = True
    except OSError:
        out["root_writable"] = False
    with open(f"/data/out-{index}.json", "w") as handle:
        json.dump(out, handle)
    with open("/dev/termination-log", "w") as handle:
        handle.write(json.dumps({"index": index}))
    """
)


def job(
    name: str, command: list[str], *, completions: int = 1, env: list[Obj] | None = None, **pod: Any
) -> Obj:
    template: Obj = {
        "metadata": {"labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "specops/workload:e2e", "command": command, "env": env or []}
            ],
            **pod,
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": template,
        },
    }


def create(plane: ControlPlane, ns: str, *objects: Obj) -> None:
    for obj in objects:
        plane.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(obj))


def claim(name: str, mode: str) -> Obj:
    """A 1Gi claim of the default class (the executor provisions it)."""
    spec = {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def pods(plane: ControlPlane, ns: str, selector: str) -> list[Obj]:
    listing = plane.get_json("pods", "-n", ns, "-l", selector) or {}
    return list(listing.get("items") or [])


def terminated(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0].get("state", {}).get("terminated") or {})


def test_indexed_pods_get_env_volumes_dns_user_and_a_read_only_root(
    control_plane: ControlPlane, executor: PodExecutor, pods_ns: str
) -> None:
    plane, ns = control_plane, pods_ns
    create(
        plane,
        ns,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"}, "stringData": {"token": "s3cret"}},
        claim("shared", "ReadWriteMany"),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "ranks"},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "probe"}},
        },
    )
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {
            "name": "INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
        },
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "PEER", "value": "probe-0.ranks"},
        {"name": "HOME", "value": "/tmp"},
    ]
    spec = job(
        "probe",
        ["python", "-c", PROBE, "rank-$(INDEX)", "$$(INDEX)"],
        completions=2,
        env=env,
        subdomain="ranks",
        securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": True},
        volumes=[
            {"name": "config", "configMap": {"name": "cfg"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    )
    container = spec["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
    container["volumeMounts"] = [
        {"name": "config", "mountPath": "/etc/config", "readOnly": True},
        {"name": "data", "mountPath": "/data"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    create(plane, ns, spec)
    until(
        lambda: ((plane.get_json("job", "probe", "-n", ns) or {}).get("status") or {}).get("succeeded") == 2,
        timeout=90,
        what="both probe pods to succeed",
    )
    shared = executor.claim_dir(ns, "shared")
    outs = {i: json.loads((shared / f"out-{i}.json").read_text()) for i in ("0", "1")}
    ips = {}
    for index, out in outs.items():
        assert out["hostname"] == f"probe-{index}"
        assert out["token"] == "s3cret" and out["greeting"] == "hello"
        assert out["uid"] == 1000 and 1000 in out["groups"]
        assert out["root_writable"] is False
        assert out["cwd"] == "/home/specops" and out["home"] == "/tmp"
        assert out["args"] == [f"rank-{index}", "$(INDEX)"]
        ips[index] = out["ip"]
    assert ips["0"] != ips["1"] and all(ip.startswith("127.0.") for ip in ips.values())
    assert outs["1"]["peer"] == ips["0"], "probe-0.ranks resolves to rank 0's pod IP"
    finished = pods(plane, ns, "app=probe")
    assert sorted(p["metadata"]["annotations"][INDEX_ANNOTATION] for p in finished) == ["0", "1"]
    for pod in finished:
        assert pod["status"]["podIP"] == outs[pod["metadata"]["annotations"][INDEX_ANNOTATION]]["ip"]
        assert json.loads(terminated(pod)["message"]) == {
            "index": pod["metadata"]["annotations"][INDEX_ANNOTATION]
        }
    assert {p["spec"]["nodeName"] for p in finished} == {"e2e-node-0", "e2e-node-1"}, "spread over both nodes"


def test_exit_codes_signals_and_log_fallback_reach_pod_status(
    control_plane: ControlPlane, executor: PodExecutor, pods_ns: str
) -> None:
    plane, ns = control_plane, pods_ns
    failing = job(
        "fails", ["python", "-c", "import sys; print('error: bad field x', file=sys.stderr); sys.exit(3)"]
    )
    failing["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    sleeper = job("sleeps", ["python", "-c", "import time; time.sleep(600)"])
    missing = job("missing", ["no-such-command"])
    create(plane, ns, failing, sleeper, missing)
    state = until(lambda: terminated(next(iter(pods(plane, ns, "app=fails")), {})), timeout=60, what="exit 3")
    assert state["exitCode"] == 3 and state["reason"] == "Error"
    assert "error: bad field x" in state["message"]
    until(
        lambda: [p for p in pods(plane, ns, "app=sleeps") if p["status"].get("phase") == "Running"],
        timeout=60,
        what="sleeper running",
    )
    name = pods(plane, ns, "app=sleeps")[0]["metadata"]["name"]
    until(
        lambda: executor._main_pid(next(r for r in executor.pods.values() if r.name == name)),
        what="container PID",
    )
    executor.kill(ns, name, signal.SIGKILL)
    killed = until(
        lambda: terminated(next(p for p in pods(plane, ns, "app=sleeps") if p["metadata"]["name"] == name)),
        timeout=30,
        what="SIGKILL seen",
    )
    assert killed["exitCode"] == 137 and killed["signal"] == 9
    absent = until(
        lambda: terminated(next(iter(pods(plane, ns, "app=missing")), {})), timeout=60, what="exec failure"
    )
    assert absent["exitCode"] == 127


def test_unschedulable_and_multi_attach_are_reported_as_a_cluster_would(
    control_plane: ControlPlane, executor: PodExecutor, pods_ns: str
) -> None:
    plane, ns = control_plane, pods_ns
    create(plane, ns, claim("single", "ReadWriteOnce"))
    greedy = job("greedy", ["python", "-c", "pass"])
    greedy["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": 99}}
    volume = {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "single"}}]}
    holder = job("holder", ["python", "-c", "import time; time.sleep(600)"], completions=2, **volume)
    holder["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/d"}]
    create(plane, ns, greedy, holder)

    def scheduled_condition() -> Obj | None:
        for pod in pods(plane, ns, "app=greedy"):
            for cond in pod["status"].get("conditions") or []:
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    return dict(cond)
        return None

    cond = until(scheduled_condition, timeout=30, what="PodScheduled=False")
    assert cond["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in cond["message"]

    def attach_event() -> str | None:
        events = (plane.get_json("events", "-n", ns) or {}).get("items") or []
        return next((e["message"] for e in events if e["reason"] == "FailedAttachVolume"), None)

    message = until(attach_event, timeout=60, what="a Multi-Attach event")
    assert 'Multi-Attach error for volume "single"' in message
    phases = sorted(p["status"].get("phase", "") for p in pods(plane, ns, "app=holder"))
    assert phases == ["Pending", "Running"], "the second RWO user waits on the other node"
