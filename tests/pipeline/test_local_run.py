"""`specops run --local` end to end on the tiny verifier: report fields, artifacts, resume."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from specops.config import ConfigError
from specops.local_run import plan_local, run_local, summary


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

    again = run_local(plan)  # a rerun resumes: nothing regenerated, no extra training steps
    assert again["data"]["written"] == 0 and again["data"]["skipped"] == report["data"]["written"]
    assert again["training"]["step"] == report["training"]["step"]


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
