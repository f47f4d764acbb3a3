"""The command line: every config field a documented flag, overrides of any field, `--print-config`
round trips, `--version`, one-line errors (exit 2) naming the flag as typed."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from specops import cli
from specops.config import DataGenConfig, TrainConfig, load_config
from specops.config_cli import leaf_fields, list_item_model, section_model

TRAIN = "verifier: {nameOrPath: m}\ndata: {path: d}\noutputDir: o\noptim: {lr: 1.0e-3}\n"
DATAGEN = "verifier: {nameOrPath: m}\ndatasets: [{kind: hf, path: a/b}]\nsync: {kind: disk, path: out}\n"


def specops(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def every_field(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(flag, FieldInfo) for every leaf field, list entries as `N`, computed from the model alone."""
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        flag = f"{prefix}{info.alias or name}"
        section, item = section_model(info.annotation), list_item_model(info.annotation)
        if section is not None:
            out.extend(every_field(section, flag + "."))
        else:
            out.append((flag, info))
        if item is not None:
            out.extend(every_field(item, flag + ".N."))
    return out


@pytest.mark.parametrize(("command", "model"), [("generate-data", DataGenConfig), ("train", TrainConfig)])
def test_help_lists_every_field_with_its_description_and_default(
    command: str, model: type[BaseModel], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = specops(capsys, command, "--help")
    assert code == 0
    entries = {
        block.split()[0]: " ".join(block.split())
        for block in re.split(r"\n(?=  -)|\n\n", out)
        if block.startswith("  -")
    }
    fields = every_field(model)
    assert len(fields) > 40
    for flag, info in fields:
        entry = entries.get(f"--{flag}")
        assert entry, f"--{flag} is not in `specops {command} --help`"
        if info.description:
            assert " ".join(info.description.split())[:40] in entry, flag
        assert "(required)" in entry or "(default" in entry, flag


def test_top_level_help_reads_as_a_product(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = specops(capsys, "--help")
    assert code == 0 and "dispatcher" not in out and "specops.commands" not in out
    for command in cli.COMMANDS:
        assert command in out


def test_version_is_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = specops(capsys, "--version")
    assert (code, out) == (0, f"specops {importlib.metadata.version('specops')}\n")


def resolved(capsys: pytest.CaptureFixture[str], command: str, *argv: str) -> dict[str, Any]:
    code, out, err = specops(capsys, command, *argv, "--print-config")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert isinstance(data, dict)
    return data


def test_top_level_nested_and_list_fields_are_overridden_in_either_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = resolved(
        capsys,
        "train",
        *("--config", write(tmp_path, TRAIN)),
        *("--epochs", "3", "--optim.weight_decay", "0.1", "--optim.gradClip", "2"),
        *("--maxSteps", "7", "--allowedRoots", "/a,/b", "--data.shuffle", "false"),
    )
    assert (train["epochs"], train["maxSteps"], train["allowedRoots"]) == (3, 7, ["/a", "/b"])
    assert (train["optim"]["weightDecay"], train["optim"]["gradClip"], train["optim"]["lr"]) == (
        0.1,
        2.0,
        1e-3,
    )
    assert train["data"]["shuffle"] is False
    gen = resolved(
        capsys,
        "generate-data",
        *("--config", write(tmp_path, DATAGEN)),
        *("--datasets.0.maxSamples", "10", "--datasets.0.split=test"),
        *("--datasets.1.path", "x.jsonl", "--datasets.1.columns.role_key", "from"),
        *("--states.hidden_states.layers", "[1, 2]", "--regenerate.maxTurns", "2"),
    )
    first, second = gen["datasets"]
    assert (first["path"], first["maxSamples"], first["split"]) == ("a/b", 10, "test")
    assert (second["path"], second["kind"], second["columns"]["roleKey"]) == ("x.jsonl", "local", "from")
    assert gen["states"]["hiddenStates"]["layers"] == [1, 2] and gen["regenerate"]["maxTurns"] == 2


def test_null_unsets_a_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = TRAIN + "maxSteps: 5\n"
    train = resolved(capsys, "train", "--config", write(tmp_path, text), "--maxSteps", "null")
    assert train["maxSteps"] is None and train["data"]["stallTimeoutS"] == 1800.0


def test_a_config_can_come_from_flags_alone(capsys: pytest.CaptureFixture[str]) -> None:
    train = resolved(capsys, "train", "--verifier.nameOrPath", "m", "--data.path", "d", "--outputDir", "o")
    assert (train["verifier"]["nameOrPath"], train["outputDir"], train["epochs"]) == ("m", "o", 1)


@pytest.mark.parametrize(("command", "text"), [("train", TRAIN), ("generate-data", DATAGEN)])
def test_print_config_round_trips(
    command: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path, text)
    code, printed, _ = specops(
        capsys,
        command,
        "--config",
        first,
        "--seed" if command == "train" else "--engine.seed",
        "7",
        "--print-config",
    )
    assert code == 0
    again = write(tmp_path, printed, "again.yaml")
    code, reprinted, _ = specops(capsys, command, "--config", again, "--print-config")
    assert (code, reprinted) == (0, printed)
    model = TrainConfig if command == "train" else DataGenConfig
    assert load_config(model, again) == load_config(
        model, first, {"seed" if command == "train" else "engine.seed": 7}
    )
    fields = {flag for flag, _ in leaf_fields(model)}
    flat = _flat(yaml.safe_load(printed))
    unset_sections = ("datasets.", "regenerate.")  # a list, and an optional section left null
    assert {f for f in fields if not f.startswith(unset_sections)} <= set(flat)  # defaults included


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epoch", "3"], "unrecognized argument '--epoch' (did you mean --epochs?)"),
        (["--optim.weightDecay", "abc"], "optim.weightDecay: Input should be a valid number"),
        (["--optim.weight_decay", "abc"], "optim.weight_decay: Input should be a valid number"),
        (["--epochs", "true"], "epochs: Input should be a valid integer"),
        (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
        (["--draft.algorithm", "medusa"], "draft.algorithm: Input should be 'eagle3' or 'hass'"),
    ],
)
def test_bad_flags_fail_in_one_line_naming_the_flag_as_typed(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = specops(capsys, "train", "--config", write(tmp_path, TRAIN), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("specops train: error: ") and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets.2.path", "x"], "datasets.2: datasets has 1 entries (index 1 appends one)"),
        (["--datasets.0.maxSample", "3"], "no such field (did you mean --datasets.N.maxSamples?)"),
        (
            ["--datasets.0.maxSamples", "0"],
            "datasets[0].maxSamples: Input should be greater than or equal to 1",
        ),
        (["--datasets.0.maxSamples"], "argument --datasets.0.maxSamples: expected one argument"),
        (["--datasets.1.split", "x"], "datasets[1]: Value error, path is required unless preset is set"),
    ],
)
def test_bad_list_entry_flags_fail_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = specops(capsys, "generate-data", "--config", write(tmp_path, DATAGEN), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_strict_yaml_rules_still_hold_with_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, TRAIN + "epochs: 2\nepochs: 3\n")
    code, _, err = specops(capsys, "train", "--config", config, "--seed", "1")
    assert code == 2 and "duplicate key 'epochs'" in err
