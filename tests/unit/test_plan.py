"""`specops plan`: its numbers against a direct computation on the examples, and against what a
real generation then stores; the operator's pre-flight uses the same arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from specops import cli
from specops.generate import generate_data
from specops.plan import BROKER_OVERHEAD_BYTES, MEAN_TOKENS_PER_EXAMPLE, TOKEN_BYTES
from specops.stores.disk import DiskStore
from specops.testing.synthetic import make_conversations, write_jsonl
from specops_operator.api import SpeculatorTraining, load_resources
from specops_operator.estimate import estimate_storage
from specops_operator.validation import architecture

ROOT = Path(__file__).resolve().parents[2]


def plan(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    code = cli.main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def even_shards(examples: int, writers: int, shard_size: int) -> int:
    per = [examples // writers + (w < examples % writers) for w in range(writers)]
    return sum(math.ceil(n / shard_size) for n in per)


def test_the_flagship_example_direct_computation(capsys: pytest.CaptureFixture[str]) -> None:
    result, _training = plan(capsys, str(ROOT / "examples" / "eagle3-train.yaml"))
    rows, tokens = 207_865, 207_865 * MEAN_TOKENS_PER_EXAMPLE  # UltraChat train_sft, 1024 per example
    per_token = 4 * 4096 * 2 + TOKEN_BYTES  # layers [2, 16, 29, 32] x hidden 4096 x bf16 (GPU pods)
    assert (result["examples"], result["tokens"], result["bytes_per_token"]) == (rows, tokens, per_token)
    assert result["total_bytes"] == tokens * per_token
    assert (result["dtype"], result["capture"]["slots"]) == ("bfloat16", 4)
    assert result["writers"] == 16 * 4 and result["shards"] == even_shards(rows, 64, 256)
    assert result["storage_bytes"] == 8 * 2**40 and result["time"] is None  # no GPU measurement


def test_the_operator_preflight_gives_the_same_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "examples" / "eagle3-train.yaml"
    result, _training = plan(capsys, str(path))
    training = load_resources(path.read_text())[0]
    assert isinstance(training, SpeculatorTraining) and training.spec.data_gen is not None
    spec = training.spec.data_gen
    arch = architecture(spec.verifier, spec.verifier_architecture)
    assert arch is not None
    estimate = estimate_storage(spec, arch)
    assert estimate is not None and estimate.total_bytes == result["total_bytes"]


def test_an_online_example_sizes_its_broker(capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "examples" / "datagen-online.yaml"
    result, _training = plan(capsys, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    datagen = next(d for d in docs if d["kind"] == "SpeculatorDataGen")["spec"]
    training = next(d for d in docs if d["kind"] == "SpeculatorTraining")["spec"]
    ranks = training.get("nodes", 1) * training["pod"]["resources"]["limits"]["nvidia.com/gpu"]
    generators = datagen["shards"] * datagen["workers"]
    per_token = 4 * 2048 * 2 + TOKEN_BYTES  # Llama-3.2-1B: layers [2, 8, 13, 16] x 2048 x bf16
    largest = datagen.get("processor", {}).get("maxLength", 2048) * per_token
    budget = datagen["sync"]["maxBrokerBytes"]
    assert result["broker"] == {
        "in_flight_bytes": (ranks * 4 + 2 * generators) * largest,
        "budget_bytes": budget,
        "peak_bytes": budget + BROKER_OVERHEAD_BYTES,
        "limit_bytes": result["broker"]["limit_bytes"],
    }
    assert "shards" not in result


def test_a_training_whose_data_is_elsewhere_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["plan", str(ROOT / "examples" / "hass-train.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "reads qwen3-8b-sharegpt, defined elsewhere" in err and err.count("\n") == 1


def write_config(tmp_path: Path, verifier: Path, **extra: Any) -> Path:
    data = write_jsonl(tmp_path / "syn.jsonl", make_conversations(9, seed=3))
    config = {
        "verifier": {"nameOrPath": str(verifier)},
        "datasets": [{"path": str(data), "name": "syn"}],
        "states": {"hiddenStates": {"layers": [1, 4]}},
        "engine": {"device": "cpu"},
        "sync": {"path": str(tmp_path / "out"), "shardSize": 2},
        "run": {"allowedRoots": [str(tmp_path), str(verifier)], "numShards": 2},
        **extra,
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_counted_plan_matches_what_generation_stores(
    tmp_path: Path, tiny_verifier_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_verifier_dir)
    (result,) = plan(capsys, str(config))
    written = tokens = 0
    for index in (0, 1):
        report = generate_data(config, **{"run.shard_index": index})
        written, tokens = written + report.written, tokens + report.tokens
    store = DiskStore.open(tmp_path / "out", [str(tmp_path)])
    stored = [ex for part in store.partitions() for ex in store.read(part)]
    hidden = stored[0]["hidden_states"]
    assert result["tokens_source"].startswith("counted")
    assert (
        (result["examples"], result["tokens"])
        == (written, tokens)
        == (len(stored), sum(len(ex["token_ids"]) for ex in stored))
    )
    per_token = hidden.shape[1] * hidden.shape[2] * hidden.element_size() + TOKEN_BYTES
    assert result["bytes_per_token"] == per_token and result["total_bytes"] == tokens * per_token
    assert result["shards"] == len(list((tmp_path / "out").glob("shard-*.safetensors")))
    assert result["time"] is None  # the tiny verifier has no measured throughput


def test_unknown_sizes_are_said_not_guessed(
    tmp_path: Path, tiny_verifier_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_verifier_dir)
    (result,) = plan(capsys, str(config), "--estimate")
    assert "examples" not in result and "set datasets[].maxSamples" in result["unknown"]
    capped = write_config(
        tmp_path, tiny_verifier_dir, datasets=[{"path": str(tmp_path / "syn.jsonl"), "maxSamples": 5}]
    )
    (result,) = plan(capsys, str(capped), "--estimate")
    limit = 2048  # processor.maxLength and engine.maxSeqLen defaults
    assert (result["examples"], result["tokens"]) == (5, 5 * min(limit, MEAN_TOKENS_PER_EXAMPLE))
    assert result["tokens_source"].startswith("estimated")
