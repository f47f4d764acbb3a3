"""`specops train` with upstream's architecture flags on (draft.normBeforeFc, normOutput, a
sliding-window layer): the flags reach the trained draft, the export reloads to the same model,
and a config asking for what the draft cannot be is one exit-2 line naming the field."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
import yaml
from _train_support import make_examples, small_world

from specops import cli
from specops.models.base import SpeculatorModel
from specops.models.eagle3 import Eagle3DraftModel
from specops.train.packing import batches

FLAGS = {
    "draftVocabSize": 48,
    "numLayers": 2,
    "normBeforeFc": True,
    "normOutput": True,
    "layerTypes": ["sliding_attention", "sliding_attention"],
    "slidingWindow": 8,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_world(tmp_path_factory.mktemp("flags"), 24)


def write_config(world: dict[str, Any], name: str, draft: dict[str, Any]) -> str:
    root = world["root"]
    config = {
        "verifier": {"nameOrPath": str(world["verifier"])},
        "data": {"path": str(world["data"]), "validationFraction": 0.0, "prefetch": 0},
        "draft": draft,
        "outputDir": str(root / name),
        "tttSteps": 2,
        "tokensPerStep": 128,
        "maxSeqLen": 64,
        "maxSteps": 6,
        "optim": {"lr": 3e-3},
        "device": "cpu",
        "allowedRoots": [str(root)],
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_with_upstream_flags_exports_what_it_trained(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["train", "--config", write_config(world, "flagged", FLAGS)])
    assert code == 0, capsys.readouterr().err[-2000:]
    final = world["root"] / "flagged" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["norm_before_fc"] is True and saved["norm_output"] is True and saved["fc_norm"] is False
    assert saved["transformer_layer_config"]["layer_types"] == FLAGS["layerTypes"]
    assert saved["transformer_layer_config"]["sliding_window"] == 8
    draft = SpeculatorModel.from_pretrained(final)
    assert isinstance(draft, Eagle3DraftModel) and draft.windows == {0: 8, 1: 8}
    assert draft.input_norm is not None
    assert not torch.equal(draft.input_norm.weight, torch.ones_like(draft.input_norm.weight)), "never trained"

    # export -> reload: the reloaded draft re-saves byte-identical tensors and computes the same logits
    draft.save_pretrained(world["root"] / "again")
    again = SpeculatorModel.from_pretrained(world["root"] / "again")
    assert isinstance(again, Eagle3DraftModel)
    assert json.loads((world["root"] / "again" / "config.json").read_text()) == saved
    batch = next(batches(make_examples_for(world), "packed", 128, 64)).batch
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(draft.forward_ttt(batch, 3), again.forward_ttt(batch, 3), strict=True)
        )


@pytest.mark.skipif(importlib.util.find_spec("speculators") is None, reason="speculators is not installed")
def test_the_reference_library_loads_the_trained_draft(world: dict[str, Any]) -> None:
    from speculators import SpeculatorModel as Upstream

    final = world["root"] / "flagged" / "final"
    if not final.is_dir():
        pytest.skip("needs test_train_with_upstream_flags_exports_what_it_trained's run")
    reference = Upstream.from_pretrained(str(final))
    assert reference.config.norm_before_fc and reference.config.norm_output
    assert reference.sliding_window_indices == [0, 1] and reference.sliding_window == 8


def make_examples_for(world: dict[str, Any]) -> list[Any]:
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(world["verifier"]).eval()
    return make_examples(verifier, 2)


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        (
            {"normBeforeFc": True, "fcNorm": True},
            "draft.normBeforeFc and draft.fcNorm exclude each other",
        ),
        (
            {"numLayers": 2, "layerTypes": ["sliding_attention"], "slidingWindow": 4},
            "draft.layerTypes needs one entry per draft layer",
        ),
        (
            {"layerTypes": ["sliding_attention"]},
            "draft.slidingWindow is required exactly when draft.layerTypes has a sliding_attention layer",
        ),
        ({"slidingWindow": 4}, "draft.slidingWindow is required exactly when"),
        (
            {"numLayers": 2, "layerTypes": ["sliding_attention", "full_attention"], "slidingWindow": 4},
            "draft.layerTypes mixes full_attention and sliding_attention, which vLLM 0.32 cannot serve",
        ),
        (
            {"layerTypes": ["sliding_attention"], "slidingWindow": 2, "speculativeTokens": 5},
            "draft.slidingWindow must reach back over the draft.speculativeTokens - 1 positions",
        ),
        ({"layerTypes": ["chunked_attention"]}, "draft.layerTypes[0]: Input should be"),
    ],
)
def test_a_draft_the_model_cannot_be_is_refused(
    world: dict[str, Any], draft: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["train", "--config", write_config(world, "refused", draft)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (world["root"] / "refused").exists()
