"""`specops plan` for a training: its figures against the real store, the trainer's own plan and
draft, and the checkpoint a real `train` run writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _train_support import small_world, train_config
from safetensors.torch import load_file

from specops import cli
from specops.config import dump_config
from specops.data.split import HeldOutSplit
from specops.stores.disk import DiskStore
from specops.testing.hub import FakeHub
from specops.train.distributed import DistEnv
from specops.train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 32 * 2**10
"""How far above a real checkpoint the estimate may be: it bounds headers, JSON and RNG state."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_world(tmp_path_factory.mktemp("plantrain"), 40)


def write_train(world: dict[str, Any], name: str, **overrides: Any) -> tuple[Path, Any]:
    cfg = train_config(world["root"], world["verifier"], world["data"], name, **overrides)
    path = world["root"] / f"{name}.yaml"
    path.write_text(dump_config(cfg))
    return path, cfg


def plan(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    code = cli.main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def refused(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    code = cli.main(["plan", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tensor_bytes(file: Path) -> int:
    """Bytes of the tensors a safetensors file holds (its header and padding left out)."""
    return sum(t.numel() * t.element_size() for t in load_file(file).values())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_train_config_over_a_store_counts_what_the_trainer_reads(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path, cfg = write_train(world, "epochs", data__validation_fraction=0.25, epochs=2)
    (result,) = plan(capsys, str(path))
    store = DiskStore.open(world["data"], [str(world["root"])])
    stored = [ex for part in store.partitions() for ex in store.read(part)]
    split = HeldOutSplit(0.25, cfg.seed)
    held = [ex for ex in stored if split.held_out(ex["id"])]
    assert result["data"]["source"].startswith("counted")
    assert (result["data"]["examples"], result["data"]["tokens"]) == (
        len(stored),
        sum(len(ex["token_ids"]) for ex in stored),
    )
    assert result["held_out"]["examples"] == len(held) > 0
    assert result["train"]["examples"] == len(stored) - len(held)

    trainer = Trainer(cfg, DistEnv())
    # The estimate counts full packed batches; first-fit packing leaves gaps, so the trainer's own
    # count is higher, by at most 30% (7 for 6 here).
    assert result["steps"]["count"] <= trainer.total_steps <= math.ceil(result["steps"]["count"] * 1.3)
    params = list(trainer.draft.parameters())
    assert result["draft"]["parameters"] == sum(p.numel() for p in params)
    assert result["draft"]["trainable"] == sum(p.numel() for p in trainer.params)


def test_checkpoint_bytes_match_a_real_run(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path, cfg = write_train(
        world, "ckpt", max_steps=3, checkpoint_every=1, keep_checkpoints=2, data__validation_fraction=0.25
    )
    (result,) = plan(capsys, str(path))
    assert result["steps"]["count"] == 3
    train(cfg)
    out = Path(cfg.output_dir)
    steps = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step-00000002", "step-00000003"]
    ckpt = result["checkpoint"]
    last = steps[-1]
    assert ckpt["model_bytes"] == tensor_bytes(last / "model.safetensors")
    assert ckpt["optimizer_bytes"] == tensor_bytes(last / "state" / "optimizer.safetensors")
    real = dir_bytes(last)
    assert ckpt["model_bytes"] + ckpt["optimizer_bytes"] < real <= ckpt["bytes"] < real + MARGIN
    published = dir_bytes(out / "final") + dir_bytes(out / "best")
    assert ckpt["published"] == 2 and published <= ckpt["published_bytes"] < published + MARGIN
    on_disk = sum(dir_bytes(p) for p in steps) + published
    assert on_disk <= ckpt["peak_bytes"] and ckpt["peak_bytes"] - ckpt["bytes"] <= on_disk + MARGIN


def test_the_table_names_counted_and_estimated_figures(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = write_train(world, "table", data__validation_fraction=0.25)
    assert cli.main(["plan", str(path)]) == 0
    table = capsys.readouterr().out
    for label in ("data ", "held out", "trained on", "steps", "draft", "checkpoint", "disk", "time"):
        assert f"  {label}" in table, table
    assert "counted: the store's manifests" in table and "estimated:" in table


def test_a_speculator_training_plans_its_training_from_its_generation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = ROOT / "examples" / "eagle3-train.yaml"
    generation, training = plan(capsys, str(path))
    spec = yaml.safe_load(path.read_text())["spec"]
    assert training["data"]["examples"] == generation["examples"]
    assert training["data"]["tokens"] == generation["tokens"]
    ranks = spec.get("nodes", 1) * spec["pod"]["resources"]["limits"]["nvidia.com/gpu"]
    assert training["ranks"] == ranks
    per_step = spec.get("tokensPerStep", 8192)
    row = min(spec.get("maxSeqLen", 2048), per_step)
    fraction = spec.get("data", {}).get("validationFraction", 0.05)
    train_tokens = generation["tokens"] - round(generation["tokens"] * fraction)
    epochs = spec.get("epochs", 1)
    assert training["steps"]["count"] == math.ceil(train_tokens / ranks / (per_step // row * row)) * epochs
    # No config.json of the 8B verifier here (nothing is fetched): the table of known verifiers
    # gives its shapes. Direct count of EAGLE-3's draft: frozen embedding and lm_head (draft vocab),
    # fc over 3 layers, one decoder layer whose attention reads [embed; hidden], the final norm.
    hidden, vocab, draft_vocab, mlp, heads, kv_heads, head = 4096, 128256, 32000, 14336, 32, 8, 128
    layer = 2 * hidden * heads * head + 2 * (2 * hidden * kv_heads * head) + heads * head * hidden
    layer += 3 * hidden * mlp + 3 * hidden
    trainable = 3 * hidden * hidden + layer + hidden
    assert training["draft"]["trainable"] == trainable
    assert training["draft"]["parameters"] == trainable + vocab * hidden + draft_vocab * hidden
    assert "table of known verifiers" in training["draft"]["source"]
    saved = training["draft"]["parameters"] * 4 + vocab + draft_vocab * 8  # fp32 weights, t2d, d2t
    assert training["checkpoint"]["model_bytes"] == saved
    assert training["checkpoint"]["optimizer_bytes"] > trainable * 8
    assert cli.main(["plan", str(path)]) == 0
    assert "storage         200.0Gi requested: fits" in capsys.readouterr().out
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["spec"]["storage"]["size"] = "20Gi"  # below 2 + 1 checkpoints of 5.7 GiB and final/best
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump_all(docs))
    assert cli.main(["plan", str(small)]) == 0
    assert "storage         20.0Gi requested: TOO SMALL" in capsys.readouterr().out


def test_a_stream_reads_at_most_max_steps_batches(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path, cfg = write_train(world, "stream", data__kind="zmq", data__url="tcp://127.0.0.1:5555", max_steps=7)
    (result,) = plan(capsys, str(path))
    assert result["data"]["tokens"] == 7 * cfg.tokens_per_step and result["steps"]["count"] == 7
    assert result["data"]["examples"] is None and "at most" in result["data"]["source"]
    assert cli.main(["plan", str(path)]) == 0
    assert f"{7 * cfg.tokens_per_step:,} tokens (zmq; at most" in capsys.readouterr().out


def test_bad_training_input_is_one_line_naming_the_field(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path, _ = write_train(world, "vocab", draft__draft_vocab_size=10_000)
    assert "draft.draftVocabSize" in refused(capsys, path)
    empty = world["root"] / "empty"
    empty.mkdir(exist_ok=True)
    path, _ = write_train(world, "nodata")
    text = yaml.safe_load(path.read_text())
    text["data"]["path"] = str(empty)
    path.write_text(yaml.safe_dump(text))
    assert "data.path" in refused(capsys, path)
    text["tokensPerStep"] = 4
    path.write_text(yaml.safe_dump(text))
    assert "tokensPerStep" in refused(capsys, path)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"data": {"path": "x"}}))
    assert "neither a DataGenConfig" in refused(capsys, other)


def _plan_in_child(env: dict[str, str], path: Path) -> dict[str, Any]:
    """`specops plan --json` in a fresh process: huggingface_hub reads HF_ENDPOINT/HF_HOME at import."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    code = "import sys; from specops.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "plan", str(path), "--json"],
        env={**clean, **env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_hub_verifier_is_read_from_the_cache_and_never_downloaded(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    local_path, _ = write_train(world, "hub")
    (local,) = plan(capsys, str(local_path))
    text = yaml.safe_load(local_path.read_text())
    text["verifier"]["nameOrPath"] = "acme/tiny-llama"
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(text))
    with FakeHub({"acme/tiny-llama": world["verifier"]}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        empty = _plan_in_child(env, path)
        assert "not in the local Hub cache" in empty["draft"]["unknown"] and not hub.downloads
        fetch = (
            "from huggingface_hub import hf_hub_download; hf_hub_download('acme/tiny-llama', 'config.json')"
        )
        subprocess.run([sys.executable, "-c", fetch], env={**os.environ, **env}, check=True, timeout=60)
        fetched = dict(hub.downloads)
        cached = _plan_in_child(env, path)
        assert hub.downloads == fetched and sum(fetched.values()) > 0
    assert cached["draft"]["parameters"] == local["draft"]["parameters"] > 0
    assert cached["draft"]["trainable"] == local["draft"]["trainable"]
    assert "Hub cache" in cached["draft"]["source"] and cached["checkpoint"] == local["checkpoint"]
