"""Every supported verifier family end to end on CPU with a tiny random-weight model built from its
config: the head's targets equal the verifier's own logits, the Transformers engine captures what a
direct forward gives, a draft trains, evaluates lossless and exports in the speculators format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from specops.config import ConfigError, DataGenConfig, TrainConfig, load_config
from specops.engines.capture import LayerCapture
from specops.evaluate import eos_ids, evaluate
from specops.generate import generate_data
from specops.models.base import SpeculatorModel
from specops.models.families import FAMILIES, UnsupportedVerifier, unservable_draft
from specops.models.verifier_head import VerifierHead
from specops.stores.disk import DiskStore
from specops.testing.families import FAMILY_CONFIGS, build_family_verifier, family_config, tiny_tokenizer
from specops.testing.synthetic import make_conversations, write_jsonl
from specops.train.trainer import train

ARCHITECTURES = sorted(FAMILIES)
NARROW = {"GptOssForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"}
"""Families whose test draft is narrower (48) than the verifier (64): `target_hidden_size`."""


def draft_shape(architecture: str) -> dict[str, Any]:
    """Two layers (one for gpt-oss, whose multi-layer drafts vLLM cannot serve); Qwen3-style layers
    for the Qwen3 families; some drafts narrower."""
    return {
        "num_layers": 1 if architecture == "GptOssForCausalLM" else 2,
        "layer_style": "qwen3" if architecture.startswith("Qwen3") else "llama",
        "hidden_size": 48 if architecture in NARROW else None,
    }


def test_every_family_has_a_tiny_model() -> None:
    assert sorted(FAMILY_CONFIGS) == ARCHITECTURES


def test_only_drafts_vllm_cannot_serve_are_refused() -> None:
    refused = {
        name: unservable_draft(family_config(name, 64), layers)
        for name in ARCHITECTURES
        for layers in (1, 2)
        if unservable_draft(family_config(name, 64), layers)
    }
    assert list(refused) == ["GptOssForCausalLM"]  # Gemma mixes windows too, but vLLM serves no Gemma draft


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("families")
    tiny_tokenizer(base / "tokenizer")
    write_jsonl(base / "chats.jsonl", make_conversations(8, seed=3))
    return base


def verifier_dir(root: Path, architecture: str) -> Path:
    out = root / architecture
    if not (out / "config.json").is_file():
        build_family_verifier(architecture, out, root / "tokenizer")
    return out


def load(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_head_targets_are_the_verifier_logits(root: Path, architecture: str) -> None:
    path = verifier_dir(root, architecture)
    model = load(path)
    layers = model.get_decoder().layers
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LayerCapture(layers, [len(layers)]) as capture:
        expected = model(ids).logits
    last = capture.captured[len(layers)]
    head = VerifierHead.from_pretrained(path)
    torch.testing.assert_close(head.logits(last), expected, rtol=1e-5, atol=1e-5)
    t2d = torch.rand(head.vocab_size, generator=torch.Generator().manual_seed(2)) < 0.4
    torch.testing.assert_close(head.draft_logits(last, t2d), expected[..., t2d], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_generate_train_evaluate_export(root: Path, architecture: str) -> None:
    path = verifier_dir(root, architecture)
    work = root / f"run-{architecture}"
    roots = [str(root)]
    generate_data(
        DataGenConfig.model_validate(
            {
                "verifier": {"name_or_path": str(path)},
                "datasets": [{"path": str(root / "chats.jsonl"), "name": "chats"}],
                "sync": {"path": str(work / "data")},
                "engine": {"device": "cpu", "batch_size": 4, "max_seq_len": 256},
                "run": {"allowed_roots": roots},
            }
        )
    )
    model = load(path)
    layers = model.get_decoder().layers
    store = DiskStore.open(work / "data", roots)
    meta = store.meta
    example = next(store.read(store.partitions()[0]))
    ids = example["token_ids"].long()[None]
    with torch.no_grad(), LayerCapture(layers, list(meta.layer_ids)) as capture:
        model.get_decoder()(input_ids=ids, use_cache=False)
    torch.testing.assert_close(example["hidden_states"], capture.stacked()[0], rtol=1e-5, atol=1e-5)

    shape = draft_shape(architecture)
    cfg = load_config(
        TrainConfig,
        {
            "verifier": {"name_or_path": str(path)},
            "data": {"path": str(work / "data"), "validation_fraction": 0.0, "prefetch": 0},
            "draft": {"draft_vocab_size": 64, **shape},
            "optim": {"lr": 3e-3},
            "output_dir": str(work / "train"),
            "ttt_steps": 2,
            "tokens_per_step": 256,
            "max_seq_len": 256,
            "max_steps": 3,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "device": "cpu",
            "allowed_roots": roots,
        },
    )
    if architecture == "GptOssForCausalLM":  # refused before any step: vLLM could not serve it
        two = cfg.model_copy(update={"draft": cfg.draft.model_copy(update={"num_layers": 2})})
        with pytest.raises(
            ConfigError, match=r"draft\.numLayers: vLLM cannot serve a draft of 2 layers for gpt-oss"
        ):
            train(two)
    result = train(cfg)
    assert result.final is not None and not result.interrupted
    saved = json.loads((result.final / "config.json").read_text())
    assert saved["speculators_config"]["verifier"]["architectures"] == [architecture]
    layer = saved["transformer_layer_config"]
    assert (layer["model_type"], layer["num_hidden_layers"]) == (shape["layer_style"], shape["num_layers"])
    assert layer["hidden_size"] == (shape["hidden_size"] or 64)
    assert saved["target_hidden_size"] == (64 if shape["hidden_size"] else None)
    draft = SpeculatorModel.from_pretrained(result.final)
    prompts = [example["token_ids"][:12].tolist(), example["token_ids"][:7].tolist()]
    eos = eos_ids(model)
    references = [uncached_greedy(model, p, 16, eos) for p in prompts]
    report = evaluate(model, draft, prompts, max_new_tokens=16, references=references)  # type: ignore[arg-type]
    assert report.lossless and report.drafts > 0, report


def uncached_greedy(model: Any, prompt: list[int], count: int, eos: set[int]) -> list[int]:
    """The reference no cache can get wrong: the whole sequence recomputed for every token."""
    out: list[int] = []
    with torch.no_grad():
        while len(out) < count and not (out and out[-1] in eos):
            out.append(int(model(torch.tensor([[*prompt, *out]])).logits[0, -1].argmax()))
    return out


def test_an_unsupported_architecture_is_refused_before_any_work(root: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=578)).save_pretrained(path)
    for item in (root / "tokenizer").iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(path)},
            "datasets": [{"path": str(root / "chats.jsonl")}],
            "sync": {"path": str(tmp_path / "data")},
            "run": {"allowed_roots": [str(root), str(tmp_path)]},
        }
    )
    for workers in (1, 2):
        config.run.num_workers = workers
        with pytest.raises(
            UnsupportedVerifier, match="verifier architecture GPT2LMHeadModel is not supported"
        ):
            generate_data(config)
        assert not (tmp_path / "data").exists()
    with pytest.raises(UnsupportedVerifier, match="GPT2LMHeadModel"):
        VerifierHead.from_pretrained(path)
