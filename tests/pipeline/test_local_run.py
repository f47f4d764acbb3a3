"""`specops run --local` end to end on the tiny verifier: report fields, artifacts, resume."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from specops.config import ConfigError
from specops.local_run import LocalPlan, plan_local, run_local, run_provenance, summary


def _training_yaml(tmp_path: Path, verifier: Path, data: Path, **spec: object) -> Path:
    doc = {
        "apiVersion": "specops.dev/v1alpha1",
        "kind": "SpeculatorTraining",
        "metadata": {"name": "tiny"},
        "spec": {
            "dataGen": {
                "verifier": {"nameOrPath": str(verifier)},
                "datasets": [{"path": str(data), "name": "syn"}],
                "processor": {"maxLength": 192},
                "mode": "offline",
                "storage": {"size": "1Gi"},
                "sync": {"shardSize": 16},
            },
            "draft": {"draftVocabSize": 256, "speculativeTokens": 3},
            "optim": {"lr": 3e-3},
            "data": {"validationFraction": 0.2},
            "epochs": 2,
            "logEvery": 2,
            "tokensPerStep": 1024,
            "maxSeqLen": 192,
            "storage": {"size": "1Gi"},
            "evaluation": {"maxPrompts": 4, "maxNewTokens": 12},
            **spec,
        },
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_local_run_reports_and_resumes(
    tmp_path: Path, tiny_verifier_dir: Path, synthetic_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECOPS_ALLOWED_ROOTS", f"{tiny_verifier_dir}:{synthetic_jsonl.parent}")
    plan = plan_local(_training_yaml(tmp_path, tiny_verifier_dir, synthetic_jsonl), tmp_path / "out")
    report = run_local(plan)

    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    assert (tmp_path / "out" / "logs" / "run.log").is_file()
    assert (
        report["data"]["written"] > 0
        and report["data"]["ok"]
        and report["data"]["engine"] == plan.datagen.engine.kind
    )
    assert report["training"]["step"] > 0 and report["training"]["final_loss"] is not None
    assert Path(report["speculator"], "config.json").is_file()
    assert report["lossless"] is True
    assert report["acceptance_length"] >= 1.0 and report["baseline_acceptance_length"] >= 1.0
    assert report["better_than_baseline"] == (
        report["acceptance_length"] > report["baseline_acceptance_length"]
    )
    argv = shlex.split(report["serve"]["long"])
    assert argv[:2] == ["vllm", "serve"] and json.loads(argv[4])["model"] == report["speculator"]
    assert "acceptance:" in summary(report)
    # Evaluated on the conversations the training held out; the validation curve picked a best.
    source = report["evaluation_prompts"]
    assert source["held_out"] is True and source["split"] == {
        "by": "conversation",
        "fraction": 0.2,
        "seed": 0,
    }
    assert source["prompts"] == report["evaluation"]["trained"]["prompts"] > 0
    assert report["training"]["best"] is not None and "held out of training" in summary(report)
    assert source["held_out_conversations"] >= source["conversations"]
    assert source["stored_conversations"] > source["held_out_conversations"]
    _check_report_files(tmp_path / "out", plan, report)

    again = run_local(plan)  # a rerun resumes: nothing regenerated, no extra training steps
    assert again["data"]["written"] == 0 and again["data"]["skipped"] == report["data"]["written"]
    assert again["training"]["step"] == report["training"]["step"]
    assert again["provenance"] == report["provenance"]
    # The config digest follows the resolved configs: another learning rate, another digest.
    other = plan_local(_training_yaml(tmp_path, tiny_verifier_dir, synthetic_jsonl, optim={"lr": 1e-3}))
    assert run_provenance(other, "")["config_sha256"] != report["provenance"]["config_sha256"]


def _check_report_files(out: Path, plan: LocalPlan, report: dict[str, Any]) -> None:
    """Provenance with real values, rounded floats, the 1600x900 figure, every stage in run.log."""
    import torch
    import transformers

    import specops

    made = report["provenance"]
    assert made["versions"]["specops"] == specops.__version__
    assert made["versions"]["torch"] == torch.__version__
    assert made["versions"]["transformers"] == transformers.__version__
    configs = (out / "datagen.yaml").read_bytes() + (out / "train.yaml").read_bytes()
    assert made["config_sha256"] == "sha256:" + hashlib.sha256(configs).hexdigest()
    manifest = (out / "data" / "manifest.json").read_bytes()
    assert made["data"]["manifests"] == ["manifest.json"]
    assert made["data"]["manifest_sha256"] == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert made["verifier"]["id"] == plan.train.verifier.name_or_path and made["verifier"]["revision"] is None
    checkout = Path(specops.__file__).parent
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # run from a git checkout (as the tests are)
        assert made["git"]["commit"] == head.stdout.strip() and isinstance(made["git"]["dirty"], bool)
    else:
        assert made["git"] is None

    speedup = report["estimated_speedup"]
    assert 0 < speedup["draft_cost_ratio"] < 1
    k = plan.train.draft.speculative_tokens
    expected = report["acceptance_length"] / (1 + k * speedup["draft_cost_ratio"])
    assert speedup["value"] == pytest.approx(expected, rel=1e-3)
    floats = _floats(report)
    assert floats and all(float(f"{x:.4g}") == x for x in floats), "report.json floats are rounded"

    with Image.open(out / "report.png") as image:
        assert image.size == (1600, 900)
    log = (out / "logs" / "run.log").read_text()
    for line in (
        "[1/3] generating data",
        "[2/3] training",
        "[train step 2]",  # the trainer's own lines (logEvery: 2)
        "done: ",
        "[3/3] evaluating",
        "held-out conversations (split by conversation: fraction ",
        "verifier greedy references: prompt",
        f"evaluate trained draft: prompt {report['evaluation_prompts']['prompts']}/",
        "evaluate untrained draft: prompt",
        "report: ",
    ):
        assert line in log, f"run.log lacks {line!r}"


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in _floats(item)]
    if isinstance(value, list):
        return [f for item in value for f in _floats(item)]
    return []


def test_missing_data_gen_ref_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    doc = {
        "apiVersion": "specops.dev/v1alpha1",
        "kind": "SpeculatorTraining",
        "metadata": {"name": "t"},
        "spec": {"dataGenRef": {"name": "elsewhere"}, "storage": {"size": "1Gi"}},
    }
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"spec\.dataGenRef\.name: no SpeculatorDataGen 'elsewhere'"):
        plan_local(path)


def test_file_without_training_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="expected exactly one SpeculatorTraining, found 0"):
        plan_local(path)


def test_the_yaml_s_engine_is_kept_else_vllm_only_where_a_gpu_runs_it(
    tmp_path: Path, tiny_verifier_dir: Path, synthetic_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from specops.engines import vllm as vllm_engine

    monkeypatch.setenv("SPECOPS_ALLOWED_ROOTS", f"{tiny_verifier_dir}:{synthetic_jsonl.parent}")
    unnamed = _training_yaml(tmp_path, tiny_verifier_dir, synthetic_jsonl)
    named = tmp_path / "named.yaml"
    doc = yaml.safe_load(unnamed.read_text())
    doc["spec"]["dataGen"]["engine"] = {"kind": "transformers"}
    named.write_text(yaml.safe_dump(doc))

    here = "vllm" if vllm_engine.vllm_available() and torch.cuda.is_available() else "transformers"
    assert plan_local(unnamed).datagen.engine.kind == here
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan_local(unnamed).datagen.engine.kind == "vllm"
    assert plan_local(named).datagen.engine.kind == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_local(unnamed).datagen.engine.kind == "transformers"


def test_local_processes_take_free_ports_not_the_pods_fixed_one(
    tmp_path: Path, tiny_verifier_dir: Path, synthetic_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator renders metrics.port 9400 for pods (one per pod IP); on one machine two runs
    (or a run beside CI) would collide there, so a local run's processes bind ports the OS picks."""
    from specops.stores.streaming import MetricsServer
    from specops.train.progress import Progress

    monkeypatch.setenv("SPECOPS_ALLOWED_ROOTS", f"{tiny_verifier_dir}:{synthetic_jsonl.parent}")
    plan = plan_local(_training_yaml(tmp_path, tiny_verifier_dir, synthetic_jsonl))
    assert plan.train.metrics.port == 0 and plan.datagen.metrics.port == 0
    assert plan.train.metrics.host == plan.datagen.metrics.host == "127.0.0.1"
    servers = [MetricsServer(plan.train.metrics.port, Progress(0, 1, 0)) for _ in range(2)]
    assert len({s.port for s in servers}) == 2 and 0 not in {s.port for s in servers}
    for server in servers:
        server.close()


def test_with_nproc_2_every_line_of_rank_0_reaches_run_log_once(
    tmp_path: Path,
    tiny_verifier_dir: Path,
    synthetic_jsonl: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Under torchrun, rank 0's log records (stderr) join its stdout lines in run.log; the other
    rank's stay on the console, and no line is kept twice."""
    monkeypatch.setenv("SPECOPS_ALLOWED_ROOTS", f"{tiny_verifier_dir}:{synthetic_jsonl.parent}")
    path = _training_yaml(
        tmp_path, tiny_verifier_dir, synthetic_jsonl, epochs=1, logEvery=1, tokensPerStep=256
    )
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["dataGen"]["datasets"][0]["maxSamples"] = 16
    doc["spec"]["dataGen"]["sync"]["shardSize"] = 4  # partitions for both ranks
    doc["spec"]["evaluation"] = {"enabled": False}
    path.write_text(yaml.safe_dump(doc))
    report = run_local(plan_local(path, tmp_path / "out", nproc=2))
    assert report["training"]["step"] > 0

    log = (tmp_path / "out" / "logs" / "run.log").read_text().splitlines()
    joined = [line for line in log if "joined the gloo process group" in line]
    # The trainer's logging line, which reached only the console before.
    assert len(joined) == 1 and "rank 0 of world size 2" in joined[0], joined
    steps = [line[line.index("[train step ") :] for line in log if "[train step " in line]
    assert steps and len(steps) == len(set(steps))
    console = capfd.readouterr()
    assert "rank 1 of world size 2" in console.err  # the other rank's stderr: on the console only
    assert "rank 0 of world size 2" in console.out and "rank 0 of world size 2" not in console.err
