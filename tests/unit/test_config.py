from pathlib import Path

import pytest

from specops.config import ConfigError, DataGenConfig, TrainConfig, apply_overrides, dump_config, load_config

BASE = {
    "verifier": {"nameOrPath": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "datasets": [{"kind": "hf", "path": "anon8231489123/ShareGPT_Vicuna_unfiltered"}],
    "sync": {"kind": "disk", "path": "out/shards"},
}


def test_camel_and_snake_spellings_parse_alike() -> None:
    snake = load_config(DataGenConfig, {**BASE, "verifier": {"name_or_path": "m"}})
    camel = load_config(DataGenConfig, {**BASE, "verifier": {"nameOrPath": "m"}})
    assert snake == camel
    assert snake.verifier.name_or_path == "m"


def test_override_replaces_camel_case_key(tmp_path: Path) -> None:
    doc = {**BASE, "engine": {"batchSize": 2}}
    cfg = load_config(DataGenConfig, doc, {"engine.batch_size": 5, "run.num_workers": 3})
    assert cfg.engine.batch_size == 5
    assert cfg.run.num_workers == 3


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"engine\.batchsize: Extra inputs are not permitted"):
        load_config(DataGenConfig, {**BASE, "engine": {"batchsize": 2}})


def test_states_loss_mask_is_refused_not_ignored() -> None:
    """The mask is always stored; the switch that changed nothing must not be accepted silently."""
    with pytest.raises(ConfigError, match=r"states\.lossMask: Extra inputs are not permitted"):
        load_config(DataGenConfig, {**BASE, "states": {"lossMask": False}})


def test_bad_enum_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"engine\.kind: .*'transformers' or 'vllm'"):
        load_config(DataGenConfig, {**BASE, "engine": {"kind": "onnx"}})


def test_disk_sync_needs_path() -> None:
    with pytest.raises(ConfigError, match=r"sync\.path is required"):
        load_config(DataGenConfig, {**BASE, "sync": {"kind": "disk"}})


def test_shard_index_must_be_below_num_shards() -> None:
    with pytest.raises(ConfigError, match=r"run\.shard_index=2 must be < run\.num_shards=2"):
        load_config(DataGenConfig, BASE, {"run.shard_index": 2, "run.num_shards": 2})


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(DataGenConfig, BASE, {"engine.batch_size": 4})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert "batchSize: 4" in path.read_text()
    assert load_config(DataGenConfig, path) == cfg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config(DataGenConfig, tmp_path / "nope.yaml")


def test_train_config_defaults() -> None:
    cfg = load_config(TrainConfig, {"verifier": {"nameOrPath": "m"}, "data": {"path": "d"}, "outputDir": "o"})
    assert cfg.ttt_steps == 3 and cfg.draft.algorithm == "eagle3"


def test_apply_overrides_creates_levels() -> None:
    assert apply_overrides({"a": 1}, {"b.c.d": 2}) == {"a": 1, "b": {"c": {"d": 2}}}


TRAIN = {"verifier": {"nameOrPath": "m"}, "data": {"path": "d"}, "outputDir": "o"}


@pytest.mark.parametrize(
    ("optim", "field"),
    [
        ("weightDecay: .inf", r"optim\.weightDecay:"),
        ("weightDecay: 1e308", r"optim\.weightDecay:"),
        ("betas: [2, -1]", r"optim\.betas\[0\]"),
        ("betas: [0.9, 1.0]", r"optim\.betas\[1\]"),
        ("lr: .nan", r"optim\.lr"),
        ("eps: 0", r"optim\.eps"),
        ("gradClip: .inf", r"optim\.gradClip:"),
        ("warmupSteps: 100000000000000000000", r"optim\.warmupSteps:"),
    ],
)
def test_optimizer_fields_are_bounded_at_validation(tmp_path: Path, optim: str, field: str) -> None:
    """`weightDecay: .inf` used to pass and train a draft of inf tensors (exit 0); bad betas failed
    only after the verifier and data had loaded."""
    path = tmp_path / "train.yaml"
    path.write_text(f"verifier: {{nameOrPath: m}}\ndata: {{path: d}}\noutputDir: o\noptim: {{{optim}}}\n")
    with pytest.raises(ConfigError, match=field):
        load_config(TrainConfig, path)


BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BOMB, r"aliases \(\*a\) are not allowed"),  # ~400 MB once expanded (_snake_keys copied it all)
        ("verifier: {nameOrPath: m}\nverifier: {nameOrPath: n}\n", r"duplicate key 'verifier'"),
        ("engine: {batchSize: true}\n", r"engine\.batchSize: .*not the boolean True"),
        (
            "engine: {batchSize: 2, batch_size: 3}\n",
            r"engine\.batchSize and batch_size are the same field set twice",
        ),
        ("engine: {seed: 1180591620717411303424}\n", r"engine\.seed: .*does not fit in 64 bits"),
        ("engine: {maxSeqLen: 8}\n", r"engine\.maxSeqLen: Input should be greater than or equal to 16"),
        ('run: {allowedRoots: ["/tmp\\0x"]}\n', r"run\.allowedRoots: .*contains a NUL byte"),
    ],
)
def test_surprising_yaml_is_refused_naming_the_field_as_spelled(
    tmp_path: Path, text: str, message: str
) -> None:
    """Each of these used to pass silently (aliases, last duplicate wins, `true` as 1, one
    spelling wins), exhaust memory, or fail far from the field (seed: 2**70)."""
    path = tmp_path / "datagen.yaml"
    path.write_text("datasets: [{kind: hf, path: p}]\nsync: {kind: disk, path: out}\n" + text)
    if "verifier" not in text:
        path.write_text(path.read_text() + "verifier: {nameOrPath: m}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(DataGenConfig, path)
