"""Research EAGLE-3 checkpoints (midlayer.* names) -> speculators format, round-tripped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from _models_support import VOCAB, new_draft, packed_batch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from specops.commands import convert as convert_command
from specops.models.base import SpeculatorModel
from specops.models.config import SpeculatorFormatError
from specops.models.convert import convert_research_checkpoint, rename_research_weights
from specops.models.eagle3 import Eagle3DraftModel


@pytest.fixture(scope="module")
def draft(verifier: LlamaForCausalLM, verifier_dir: Path) -> Eagle3DraftModel:
    model = new_draft(verifier, verifier_dir).eval()
    with torch.no_grad():  # make the head differ from the verifier's so a copy-back would be caught
        model.lm_head.weight.mul_(1.5)
    return model


def research_checkpoint(
    draft: Eagle3DraftModel, path: Path, *, fmt: str = "safetensors", mapping: bool = True
) -> Path:
    """Write `draft` the way SafeAILab's EAGLE-3 trainer does: midlayer.* names, no embedding."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        name.replace("layers.0.", "midlayer."): t.clone()
        for name, t in draft.state_dict().items()
        if name != "embed_tokens.weight" and (mapping or name not in ("d2t", "t2d"))
    }
    layer = draft.config.layer_config
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": layer.hidden_size,
        "intermediate_size": layer.intermediate_size,
        "num_attention_heads": layer.num_attention_heads,
        "num_key_value_heads": layer.num_key_value_heads,
        "num_hidden_layers": 1,
        "rms_norm_eps": layer.rms_norm_eps,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "vocab_size": VOCAB,
        "draft_vocab_size": int(draft.lm_head.weight.shape[0]),
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(tensors, str(path / "model.safetensors"))
    else:
        torch.save(tensors, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_round_trip_of_a_research_checkpoint(
    verifier: LlamaForCausalLM, verifier_dir: Path, draft: Eagle3DraftModel, tmp_path: Path, fmt: str
) -> None:
    source = research_checkpoint(draft, tmp_path / "research", fmt=fmt)
    convert_research_checkpoint(
        source, tmp_path / "out", verifier=verifier_dir, speculative_tokens=5, aux_layer_ids=[1, 2, 3]
    )
    loaded = SpeculatorModel.from_pretrained(tmp_path / "out")
    assert isinstance(loaded, Eagle3DraftModel)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    batch = packed_batch(verifier, [torch.arange(10) % VOCAB])
    with torch.no_grad():
        for a, b in zip(draft.forward_ttt(batch, 3), loaded.forward_ttt(batch, 3), strict=True):
            assert torch.equal(a, b)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(verifier_dir)
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["transformer_layer_config"]["rope_parameters"]["rope_theta"] == 10000.0


def test_defaults_from_the_verifier_and_full_vocab_without_mapping(
    verifier_dir: Path, tmp_path: Path
) -> None:
    verifier = LlamaForCausalLM.from_pretrained(verifier_dir)
    full = new_draft(verifier, verifier_dir, draft_vocab=VOCAB)
    source = research_checkpoint(full, tmp_path / "research", mapping=False)
    model = convert_research_checkpoint(source, tmp_path / "out", verifier=verifier_dir)
    assert model.t2d.all() and not model.d2t.any()
    assert model.config.eagle_aux_hidden_state_layer_ids == [2, 2, 1], "EAGLE-3 default [2, N//2, N-3]"


def test_rename_rejects_unknown_tensors() -> None:
    assert set(
        rename_research_weights({"midlayer.mlp.up_proj.weight": torch.zeros(1), "d2t": torch.zeros(1)})
    ) == {
        "layers.0.mlp.up_proj.weight",
        "d2t",
    }
    with pytest.raises(SpeculatorFormatError, match="unknown tensors"):
        rename_research_weights({"medusa_head.0.weight": torch.zeros(1)})


def test_broken_research_checkpoints(draft: Eagle3DraftModel, verifier_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config"):
        convert_research_checkpoint(tmp_path, tmp_path / "o", verifier=verifier_dir)
    source = research_checkpoint(draft, tmp_path / "r1")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(SpeculatorFormatError, match="vocab_size"):
        convert_research_checkpoint(source, tmp_path / "o", verifier=verifier_dir)

    source = research_checkpoint(draft, tmp_path / "r2")
    tensors = {
        k.replace("layers.0.", "midlayer."): v
        for k, v in draft.state_dict().items()
        if k != "embed_tokens.weight"
    }
    save_file({**tensors, "d2t": tensors["d2t"] + 1}, str(source / "model.safetensors"))
    with pytest.raises(SpeculatorFormatError, match="disagree"):
        convert_research_checkpoint(source, tmp_path / "o", verifier=verifier_dir)

    save_file({**tensors, "fc.weight": torch.zeros(3, 3)}, str(source / "model.safetensors"))
    with pytest.raises(SpeculatorFormatError, match=r"fc\.weight"):
        convert_research_checkpoint(source, tmp_path / "o", verifier=verifier_dir)

    pickled = tmp_path / "r3"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save({"step": 3}, pickled / "pytorch_model.bin")
    with pytest.raises(SpeculatorFormatError, match="tensor"):
        convert_research_checkpoint(pickled, tmp_path / "o", verifier=verifier_dir)
    assert not (tmp_path / "o").exists()


def run_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specops convert")
    convert_command.register(parser)
    return convert_command.main(parser.parse_args(argv))


def test_cli_convert_eagle3(
    draft: Eagle3DraftModel, verifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = research_checkpoint(draft, tmp_path / "research")
    roots = ["--allowed-root", str(tmp_path), "--allowed-root", str(verifier_dir)]
    argv = [
        "eagle3",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out"),
        "--verifier",
        str(verifier_dir),
    ]
    assert run_convert([*argv, "--aux-layers", "1,2,3", "--verifier-name", "org/tiny", *roots]) == 0
    assert json.loads(capsys.readouterr().out)["draft_vocab_size"] == 48
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["speculators_config"]["verifier"]["name_or_path"] == "org/tiny"
    (source / "config.json").write_text("{")
    assert run_convert([*argv, *roots]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_research_checkpoint_with_upstream_flags_keeps_them(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    flags = {"norm_before_fc": True, "norm_output": True}
    draft = new_draft(
        verifier, verifier_dir, layer_types=["sliding_attention"], sliding_window=6, **flags
    ).eval()
    with torch.no_grad():
        draft.input_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    source = research_checkpoint(draft, tmp_path / "research")
    config = json.loads((source / "config.json").read_text())
    config.update(layer_types=["sliding_attention"], sliding_window=6, eagle_config=flags)
    (source / "config.json").write_text(json.dumps(config))
    convert_research_checkpoint(source, tmp_path / "out", verifier=verifier_dir, aux_layer_ids=[1, 2, 3])
    loaded = SpeculatorModel.from_pretrained(tmp_path / "out")
    assert isinstance(loaded, Eagle3DraftModel) and loaded.windows == {0: 6}
    assert loaded.config.norm_before_fc and loaded.config.norm_output
    batch = packed_batch(verifier, [torch.arange(20) % VOCAB])
    with torch.no_grad():
        for a, b in zip(draft.forward_ttt(batch, 3), loaded.forward_ttt(batch, 3), strict=True):
            assert torch.equal(a, b)

    config.pop("eagle_config")  # the tensor is there, the flag is not: refused, not dropped
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeculatorFormatError, match=r"not in the architecture \['input_norm.weight'\]"):
        convert_research_checkpoint(source, tmp_path / "out2", verifier=verifier_dir, aux_layer_ids=[1, 2, 3])


def test_a_draft_vllm_cannot_serve_for_the_verifier_is_refused(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    hybrid = tmp_path / "hybrid-verifier"
    hybrid.mkdir()
    for file in verifier_dir.iterdir():
        (hybrid / file.name).write_bytes(file.read_bytes())
    config = json.loads((hybrid / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config.update(layer_types=["sliding_attention", "full_attention"] * (layers // 2), sliding_window=8)
    (hybrid / "config.json").write_text(json.dumps(config))
    source = research_checkpoint(new_draft(verifier, verifier_dir, num_layers=2), tmp_path / "research")
    with pytest.raises(SpeculatorFormatError, match="vLLM cannot serve a draft of 2 layers for"):
        convert_research_checkpoint(source, tmp_path / "out", verifier=hybrid)


def test_a_draft_mixing_sliding_and_full_layers_is_refused(
    verifier: LlamaForCausalLM, verifier_dir: Path, tmp_path: Path
) -> None:
    mixed = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}
    source = research_checkpoint(
        new_draft(verifier, verifier_dir, num_layers=2, **mixed), tmp_path / "research"
    )
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **mixed}))
    with pytest.raises(SpeculatorFormatError, match="whose layers mix full_attention and sliding_attention"):
        convert_research_checkpoint(source, tmp_path / "out", verifier=verifier_dir)
