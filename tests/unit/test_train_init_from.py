"""`draft.initFrom`: a run starts from an existing speculator (SpecOps-exported, on a Hub, or
written by the reference `speculators` library), keeps its vocabulary mapping, refuses a
speculator of another shape or verifier, and never re-initialises a run that resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _train_support import (
    VOCAB,
    build_verifier,
    gloo_world,
    make_examples,
    train_cli,
    train_config,
    write_store,
)

from specops.config import ConfigError
from specops.example import ExampleDict
from specops.models.base import SpeculatorModel
from specops.models.vocab import build_vocab_mapping
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore
from specops.testing.hub import FakeHub
from specops.train.data import count_tokens
from specops.train.distributed import DistEnv
from specops.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One verifier, two datasets of its states with different token statistics, and a draft
    trained (and exported) on the first."""
    root = tmp_path_factory.mktemp("initfrom")
    verifier = build_verifier(root / "verifier")
    first, second = make_examples(verifier, 40, seed=1), make_examples(verifier, 40, seed=2)
    write_store(root / "first", root / "verifier", first)
    write_store(root / "data", root / "verifier", second)
    exported = train(train_config(root, root / "verifier", root / "first", "exported", max_steps=30))
    assert exported.final is not None
    return {
        "root": root,
        "verifier": root / "verifier",
        "data": root / "data",
        "examples": second,
        "final": exported.final,
    }


def config(world: dict[str, Any], output: str, **overrides: Any) -> Any:
    return train_config(world["root"], world["verifier"], world["data"], output, **overrides)


def state(directory: Path) -> dict[str, torch.Tensor]:
    return SpeculatorModel.from_pretrained(directory).state_dict()


def first_loss(output: Path) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("algorithm", ["eagle3", "hass"])
def test_a_run_starts_from_the_exported_weights_and_their_vocabulary(
    world: dict[str, Any], algorithm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    final = world["final"]
    cfg = config(
        world, f"tuned-{algorithm}", max_steps=1, draft__algorithm=algorithm, draft__init_from=str(final)
    )
    trainer = Trainer(cfg, DistEnv())
    assert trainer.step == 0 and not trainer.optimizer.state  # the optimizer starts fresh
    assert_same(trainer.draft.state_dict(), state(final))
    # The mapping is the speculator's, not the one this run's data would choose.
    chosen_here, _ = build_vocab_mapping(count_tokens(world["examples"]), VOCAB, 48)
    assert not torch.equal(trainer.draft.t2d, chosen_here)

    tuned = trainer.run()
    scratch = train(config(world, f"scratch-{algorithm}", max_steps=1, draft__algorithm=algorithm))
    assert tuned.final is not None and scratch.final is not None
    assert first_loss(world["root"] / f"tuned-{algorithm}") < 0.8 * first_loss(
        world["root"] / f"scratch-{algorithm}"
    )
    saved = json.loads((tuned.final / "config.json").read_text())
    assert saved["speculators_config"]["algorithm"] == algorithm  # this run's, not the loaded one's
    assert torch.equal(SpeculatorModel.from_pretrained(tuned.final).d2t, trainer.draft.d2t)  # type: ignore[attr-defined]
    assert f"draft.initFrom: starting from the weights of {final}" in capsys.readouterr().out


def test_a_resumed_run_keeps_its_checkpoint_not_the_init_weights(world: dict[str, Any]) -> None:
    out = "resumed"
    first = train(config(world, out, max_steps=2, checkpoint_every=2, draft__init_from=str(world["final"])))
    assert first.checkpoint is not None
    checkpoint = state(first.checkpoint)
    trainer = Trainer(config(world, out, max_steps=4, draft__init_from=str(world["final"])), DistEnv())
    assert trainer.step == 2
    assert_same(trainer.draft.state_dict(), checkpoint)
    assert any(not torch.equal(v, state(world["final"])[k]) for k, v in checkpoint.items())


class ListStream:
    """A StreamSource over a list that counts what was pulled from it."""

    def __init__(self, examples: list[ExampleDict], meta: StoreMeta) -> None:
        self.examples, self.meta, self.pulled = examples, meta, 0

    def __iter__(self) -> Iterator[ExampleDict]:
        for ex in self.examples:
            self.pulled += 1
            yield ex

    def close(self) -> None:
        pass


def test_a_stream_takes_no_vocabulary_window_and_keeps_the_loaded_mapping(world: dict[str, Any]) -> None:
    stream = ListStream(world["examples"], DiskStore.open(world["data"], [world["root"]]).meta)
    cfg = config(
        world, "stream", max_steps=3, data__vocab_window_tokens=64, draft__init_from=str(world["final"])
    )
    trainer = Trainer(cfg, DistEnv(), source=stream)
    assert stream.pulled == 0  # no window was held
    assert torch.equal(trainer.draft.t2d, state(world["final"])["t2d"])
    assert trainer.run().step == 3


@pytest.mark.parametrize(
    ("overrides", "field", "theirs", "ours"),
    [
        ({"draft__num_layers": 2}, "draft.numLayers", 1, 2),
        ({"draft__draft_vocab_size": 32}, "draft.draftVocabSize", 48, 32),
        ({"draft__layer_style": "qwen3"}, "draft.layerStyle", "'llama'", "'qwen3'"),
        ({"draft__hidden_size": 16}, "draft.hiddenSize", 32, 16),
        ({"draft__norm_before_residual": True}, "draft.normBeforeResidual", False, True),
    ],
)
def test_a_speculator_of_another_shape_is_refused_naming_the_field(
    world: dict[str, Any], overrides: dict[str, Any], field: str, theirs: Any, ours: Any
) -> None:
    cfg = config(world, "mismatch", max_steps=1, draft__init_from=str(world["final"]), **overrides)
    with pytest.raises(
        ConfigError,
        match=rf"^draft\.initFrom: .* {field} \(.*\) is {theirs} in the speculator, {ours} in this run",
    ):
        Trainer(cfg, DistEnv())


def test_a_speculator_for_another_verifier_or_other_layers_is_refused(
    world: dict[str, Any], tmp_path: Path
) -> None:
    other = world["root"] / "other-verifier"
    build_verifier(other, seed=3)  # same shapes, another model
    cfg = train_config(
        world["root"], other, world["data"], "other", max_steps=1, draft__init_from=str(world["final"])
    )
    with pytest.raises(
        ConfigError,
        match=r"draft\.initFrom: .* the verifier \(speculators_config\.verifier\.name_or_path\) is",
    ):
        Trainer(cfg, DistEnv())

    edited = world["root"] / "edited"
    edited.mkdir(exist_ok=True)
    (edited / "model.safetensors").write_bytes((world["final"] / "model.safetensors").read_bytes())
    saved = json.loads((world["final"] / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**saved, "eagle_aux_hidden_state_layer_ids": [0, 1, 2]}))
    with pytest.raises(
        ConfigError, match=r"auxiliary layers .* are \[0, 1, 2\] in the speculator, \[1, 2, 3\]"
    ):
        Trainer(config(world, "aux", max_steps=1, draft__init_from=str(edited)), DistEnv())


def test_init_from_is_refused_beside_init_from_verifier_or_vocab_from(world: dict[str, Any]) -> None:
    with pytest.raises(
        ConfigError, match=r"draft\.initFrom and draft\.initFromVerifier both set the starting weights"
    ):
        config(world, "x", draft__init_from="acme/draft", draft__init_from_verifier=True)
    with pytest.raises(
        ConfigError, match=r"data\.vocabFrom: draft\.initFrom keeps the loaded speculator.s vocabulary"
    ):
        config(world, "x", draft__init_from="acme/draft", data__vocab_from=str(world["data"]))
    with pytest.raises(ValueError, match=r"draft\.initFrom: .* is outside the allowed roots"):
        Trainer(config(world, "x", max_steps=1, draft__init_from="/etc"), DistEnv())


HUB_START = """import sys, torch
from specops.config import TrainConfig, load_config
from specops.models.base import SpeculatorModel
from specops.train.distributed import DistEnv
from specops.train.trainer import Trainer
trainer = Trainer(load_config(TrainConfig, sys.argv[1]), DistEnv())
want = SpeculatorModel.from_pretrained(sys.argv[2]).state_dict()
have = trainer.draft.state_dict()
assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)
print("same weights")
"""


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    # The shared model cache holds the verifier only: a Hub initFrom must not be looked up there.
    (tmp_path / "models").mkdir()
    return {
        **clean,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "SPECOPS_MODEL_CACHE": str(tmp_path / "models"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }


def _yaml(world: dict[str, Any], tmp_path: Path, init_from: str, revision: str | None = None) -> Path:
    cfg = config(
        world, "hub", max_steps=1, draft__init_from=init_from, draft__init_from_revision=revision
    ).model_dump(mode="json", by_alias=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_hub_id_is_downloaded_and_a_missing_one_exits_2(world: dict[str, Any], tmp_path: Path) -> None:
    with FakeHub({"acme/tiny-draft": world["final"]}) as hub:
        env = _env(hub, tmp_path)
        run = [
            sys.executable,
            "-c",
            HUB_START,
            str(_yaml(world, tmp_path, "acme/tiny-draft")),
            str(world["final"]),
        ]
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines()[-1] == "same weights"
        assert f"({tmp_path}/hf/hub/models--acme--tiny-draft/snapshots/" in done.stdout  # not the model cache
        assert hub.downloads["acme/tiny-draft"] >= 2  # config and weights came over HTTP

        missing = [
            sys.executable,
            *train_cli(tmp_path),
            "--config",
            str(_yaml(world, tmp_path, "acme/nothing")),
        ]
        refused = subprocess.run(missing, env=env, capture_output=True, text=True, timeout=240)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "draft.initFrom: 'acme/nothing': no such model on the Hub" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_hub_initfrom_is_pinned_by_initfromrevision(world: dict[str, Any], tmp_path: Path) -> None:
    """The snapshot of the commit asked for is the start; a revision the Hub lacks, or one given
    with a local directory, exits 2 naming it."""
    with FakeHub({"acme/tiny-draft": world["final"]}) as hub:
        env = _env(hub, tmp_path)
        commit = hub.repos["acme/tiny-draft"].commit
        pinned = _yaml(world, tmp_path, "acme/tiny-draft", commit)
        done = subprocess.run(
            [sys.executable, "-c", HUB_START, str(pinned), str(world["final"])],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.splitlines()[-1] == "same weights"
        assert f"/hf/hub/models--acme--tiny-draft/snapshots/{commit})" in done.stdout

        for init_from, revision, message in (
            ("acme/tiny-draft", "v9", "draft.initFrom: 'acme/tiny-draft' at revision 'v9': no such revision"),
            (
                str(world["final"]),
                "main",
                f"draft.initFromRevision: {world['final']} is a local directory, which has no revisions",
            ),
        ):
            argv = [
                sys.executable,
                *train_cli(tmp_path),
                "--config",
                str(_yaml(world, tmp_path, init_from, revision)),
            ]
            refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-2000:]


UPSTREAM = """import sys, torch
from pathlib import Path
from transformers import AutoConfig
from speculators.config import SpeculatorsConfig, VerifierConfig
from speculators.models.eagle3 import Eagle3SpeculatorConfig
from speculators.models.eagle3.core import Eagle3DraftModel
from speculators.proposals.greedy import GreedyTokenProposalConfig
from specops.models.eagle3 import draft_layer_config
verifier, out = sys.argv[1], Path(sys.argv[2])
for name, norm_output in (("upstream", False), ("upstream-norm-output", True)):
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=draft_layer_config(AutoConfig.from_pretrained(verifier), 1, "llama"),
        draft_vocab_size=48,
        eagle_aux_hidden_state_layer_ids=[1, 2, 3],
        norm_output=norm_output,
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=verifier, architectures=["LlamaForCausalLM"]),
        ),
    )
    torch.manual_seed(7)
    model = Eagle3DraftModel(config)
    ids = torch.arange(1, 64, 63 / 48).long()[:48]  # not the lowest ids: a mapping of its own
    t2d = torch.zeros(64, dtype=torch.bool)
    t2d[ids] = True
    model.load_vocab_mappings(t2d, ids - torch.arange(48))
    model.load_verifier_weights()
    model.save_pretrained(out / name)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("speculators") is None, reason="speculators is not installed")
def test_a_speculator_written_by_the_reference_library_is_the_start(world: dict[str, Any]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", UPSTREAM, str(world["verifier"]), str(world["root"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    written = load_file(world["root"] / "upstream" / "model.safetensors")
    trainer = Trainer(
        config(world, "from-upstream", max_steps=2, draft__init_from=str(world["root"] / "upstream")),
        DistEnv(),
    )
    have = trainer.draft.state_dict()
    assert set(written) == set(have)
    assert all(torch.equal(have[k], written[k].to(have[k].dtype)) for k in written)
    assert trainer.run().final is not None

    with pytest.raises(
        ConfigError,
        match=r"draft\.initFrom: .* draft\.normOutput \(norm_output\) is True in the speculator, False in this run",
    ):
        Trainer(
            config(
                world,
                "norm-output",
                max_steps=1,
                draft__init_from=str(world["root"] / "upstream-norm-output"),
            ),
            DistEnv(),
        )
    # The same architecture asked for: upstream's "Eagle 3.1" checkpoint is the start.
    normed = Trainer(
        config(
            world,
            "norm-output-asked",
            max_steps=1,
            draft__init_from=str(world["root"] / "upstream-norm-output"),
            draft__norm_output=True,
        ),
        DistEnv(),
    )
    assert normed.draft.config.norm_output and normed.run().final is not None


RANK = """import hashlib, sys
from specops.config import TrainConfig, load_config
from specops.train.distributed import init_distributed, shutdown
from specops.train.trainer import Trainer
env = init_distributed("cpu", timeout_s=120)
trainer = Trainer(load_config(TrainConfig, sys.argv[1]), env)
digest = hashlib.sha256()
for name, tensor in sorted(trainer.draft.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
print(digest.hexdigest())
shutdown(env)
"""


def test_every_rank_of_a_gloo_world_starts_from_the_same_loaded_weights(
    world: dict[str, Any], tmp_path: Path
) -> None:
    import hashlib

    path = tmp_path / "ranks.yaml"
    cfg = config(world, "ranks", max_steps=1, draft__init_from=str(world["final"]))
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    digests = gloo_world(RANK, str(path))
    digest = hashlib.sha256()
    for name, tensor in sorted(state(world["final"]).items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    assert digests == [digest.hexdigest()] * 2
