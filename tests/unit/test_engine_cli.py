"""`specops generate-data` command: report on stdout, exit codes for failures and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from specops import generate
from specops.cli import build_parser, run_command
from specops.config import ConfigError
from specops.generate import generate_data
from specops.paths import PathNotAllowedError
from specops.testing.synthetic import make_conversations, write_jsonl


def write_config(tmp_path: Path, verifier: Path, **overrides: Any) -> Path:
    data = write_jsonl(tmp_path / "syn.jsonl", make_conversations(6, seed=4))
    config = {
        "verifier": {"nameOrPath": str(verifier)},
        "datasets": [{"path": str(data), "name": "syn"}],
        "states": {"hiddenStates": {"layers": [1, 4]}},
        "engine": {"device": "cpu"},
        "sync": {"path": str(tmp_path / "out"), "shardSize": 4},
        "run": {"allowedRoots": [str(tmp_path), str(verifier)]},
        **overrides,
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, capsys: pytest.CaptureFixture[str], **overrides: Any) -> tuple[int, str, str]:
    """`specops generate-data --config FILE --key VALUE ...` through the command line parser."""
    flags = [
        a
        for key, value in overrides.items()
        for a in (f"--{key}", value if isinstance(value, str) else json.dumps(value))
    ]
    code = run_command(["generate-data", "--config", str(config), *flags], build_parser(only="generate-data"))
    out, err = capsys.readouterr()
    return code, out, err


def test_generates_and_prints_one_json_report(
    tmp_path: Path, tiny_verifier_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(write_config(tmp_path, tiny_verifier_dir), capsys, **{"engine.batch_size": 3})
    assert code == 0
    report = json.loads(out)
    assert (report["written"], report["ok"]) == (6, True) and report["tokens"] > 0
    code, out, _ = run(write_config(tmp_path, tiny_verifier_dir), capsys)
    assert code == 0 and json.loads(out)["skipped"] == 6 and json.loads(out)["written"] == 0


def test_a_rerun_with_nothing_left_never_loads_the_model(
    tmp_path: Path,
    tiny_verifier_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_config(tmp_path, tiny_verifier_dir)
    assert run(config, capsys)[0] == 0

    def no_model(*args: Any) -> None:
        raise AssertionError("the engine was loaded for a slice with nothing left")

    monkeypatch.setattr(generate, "load_engine", no_model)
    code, out, _ = run(config, capsys)
    assert code == 0 and (json.loads(out)["skipped"], json.loads(out)["written"]) == (6, 0)


def test_an_engine_that_disagrees_with_the_verifier_config_is_refused(
    tmp_path: Path, tiny_verifier_dir: Path
) -> None:
    from specops.config import DataGenConfig, load_config
    from specops.verifier import load_tokenizer

    cfg = load_config(DataGenConfig, write_config(tmp_path, tiny_verifier_dir), {})
    meta = generate.store_meta(cfg, load_tokenizer(cfg.verifier, cfg.run.allowed_roots))
    assert (meta.layer_ids, meta.num_layers) == ((1, 4), 4)
    generate.load_engine(cfg, meta)  # agrees
    with pytest.raises(
        RuntimeError, match=r"produces .* \(\(1, 4\), 4, \d+\), the verifier config says \(\(2, 4\), 4,"
    ):
        generate.load_engine(cfg, dataclasses.replace(meta, layer_ids=(2, 4)))


def test_another_producers_directory_is_refused(
    tmp_path: Path, tiny_verifier_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny_verifier_dir)
    assert run(config, capsys)[0] == 0
    code, out, err = run(config, capsys, **{"states.hidden_states.layers": [2, 4]})
    assert code == 3 and out == ""  # exitcodes.DATA: never retried
    assert "error:" in err and "layer_ids" in err


def test_missing_dataset_names_the_field(tmp_path: Path, tiny_verifier_dir: Path) -> None:
    config = write_config(tmp_path, tiny_verifier_dir, datasets=[{"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.path.*nope\.jsonl does not exist"):
        generate_data(config)


def test_workers_are_not_spawned_for_a_verifier_outside_the_roots(
    tmp_path: Path, tiny_verifier_dir: Path
) -> None:
    config = write_config(tmp_path, tiny_verifier_dir)
    with pytest.raises(PathNotAllowedError, match=r"verifier\.name_or_path"):
        generate_data(config, **{"run.num_workers": 2, "run.allowed_roots": [str(tmp_path)]})
