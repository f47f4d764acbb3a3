"""TransformersPipeline: layer conventions, capture-only-what-is-asked, batch-size-independent bytes."""

from __future__ import annotations

import functools
import gc
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.engines.transformers import TransformersPipeline
from specops.paths import cache_dir

NUM_LAYERS = 4
VOCAB = 96


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def pipeline_factory(tiny_model: LlamaForCausalLM) -> Callable[..., TransformersPipeline]:
    """Pipelines over the shared model."""
    return functools.partial(TransformersPipeline, tiny_model)


def make_examples(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    return [
        TokenizedExample(
            id=f"set/{i}/0",
            token_ids=[rng.randrange(VOCAB) for _ in range(n)],
            loss_mask=[rng.randrange(2) for _ in range(n)],
        )
        for i, n in enumerate(lengths)
    ]


# Exact bucket lengths (16, 32, 128), lengths just past a bucket edge, and a spread in between.
LENGTHS = [16, 17, 5, 32, 33, 100, 128, 129, 64, 3, 250, 47]


def test_slots_follow_the_vllm_convention(
    tiny_model: LlamaForCausalLM, pipeline_factory: Callable[..., TransformersPipeline]
) -> None:
    """Slot k == Transformers hidden_states[k]; the last slot is the pre-norm output, not hidden_states[N]."""
    pipeline = pipeline_factory(layer_ids=[0, 1, 2, 3, NUM_LAYERS])
    (example,) = make_examples([32])  # a bucket length: no padding, same shapes as the direct call
    (out,) = pipeline.forward([example])
    with torch.no_grad():
        ref = tiny_model(torch.tensor([example.token_ids]), output_hidden_states=True)
    assert len(ref.hidden_states) == NUM_LAYERS + 1
    for slot, k in enumerate(range(NUM_LAYERS)):
        assert torch.equal(out["hidden_states"][:, slot], ref.hidden_states[k][0]), f"slot {k}"
    last = out["hidden_states"][:, -1]
    post_norm = ref.hidden_states[NUM_LAYERS][0]
    assert not torch.allclose(last, post_norm, atol=1e-3), "last slot must be taken before the final norm"
    with torch.no_grad():
        assert torch.equal(tiny_model.model.norm(last), post_norm)


def test_output_matches_direct_forward_for_padded_lengths(
    tiny_model: LlamaForCausalLM, pipeline_factory: Callable[..., TransformersPipeline]
) -> None:
    """Padding to a bucket changes kernel blocking only: values agree with an unpadded forward."""
    pipeline = pipeline_factory(layer_ids=[1, 2, NUM_LAYERS])
    examples = make_examples([5, 47, 129])
    outs = pipeline.forward(examples)
    for example, out in zip(examples, outs, strict=True):
        with torch.no_grad():
            ref = tiny_model(torch.tensor([example.token_ids]), output_hidden_states=True).hidden_states
        assert out["hidden_states"].shape == (len(example.token_ids), 3, 32)
        torch.testing.assert_close(out["hidden_states"][:, 0], ref[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["hidden_states"][:, 1], ref[2][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            tiny_model.model.norm(out["hidden_states"][:, 2]), ref[NUM_LAYERS][0], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_bytes_do_not_depend_on_batch_size(
    pipeline_factory: Callable[..., TransformersPipeline], batch_size: int
) -> None:
    examples = make_examples(LENGTHS)
    reference = pipeline_factory(batch_size=1).forward(examples)
    shuffled = examples[::-1]  # different neighbours in every batch, too
    outs = pipeline_factory(batch_size=batch_size).forward(shuffled)[::-1]
    for ref, out in zip(reference, outs, strict=True):
        assert out["id"] == ref["id"]
        assert out["hidden_states"].numpy().tobytes() == ref["hidden_states"].numpy().tobytes(), out["id"]


def test_one_example_per_input_in_input_order(pipeline_factory: Callable[..., TransformersPipeline]) -> None:
    examples = make_examples(LENGTHS)
    outs = pipeline_factory(batch_size=3, max_tokens_per_batch=64).forward(examples)
    assert [o["id"] for o in outs] == [e.id for e in examples]
    for example, out in zip(examples, outs, strict=True):
        assert out["token_ids"].dtype == torch.int32 and out["token_ids"].tolist() == example.token_ids
        assert out["loss_mask"].dtype == torch.uint8 and out["loss_mask"].tolist() == example.loss_mask
        assert out["hidden_states"].shape == (len(example.token_ids), 4, 32)  # default [2, N//2, N-3, N]
        assert out["hidden_states"].is_contiguous()
        assert "logits" not in out and "output_tokens" not in out


def _count_calls(model: LlamaForCausalLM) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    calls = [0] * (NUM_LAYERS + 2)  # decoder layers, final norm, lm_head
    modules = [*model.model.layers, model.model.norm, model.lm_head]
    handles = []
    for i, module in enumerate(modules):

        def bump(*_: object, i: int = i) -> None:
            calls[i] += 1

        handles.append(module.register_forward_hook(bump))
    return calls, handles


@pytest.mark.parametrize(
    ("layer_ids", "layers_run"),
    [([1, 2], 2), ([0], 0), ([2, NUM_LAYERS], NUM_LAYERS)],
)
def test_forward_stops_after_the_deepest_layer_and_skips_the_head(
    tiny_model: LlamaForCausalLM,
    pipeline_factory: Callable[..., TransformersPipeline],
    layer_ids: list[int],
    layers_run: int,
) -> None:
    pipeline = pipeline_factory(layer_ids=layer_ids)
    calls, handles = _count_calls(tiny_model)
    try:
        (out,) = pipeline.forward(make_examples([20]))
    finally:
        for handle in handles:
            handle.remove()
    assert calls[:NUM_LAYERS] == [1] * layers_run + [0] * (NUM_LAYERS - layers_run)
    assert calls[NUM_LAYERS:] == [0, 0], "neither the final norm nor the lm_head may run"
    assert out["hidden_states"].shape[1] == len(layer_ids)


def test_logits_and_output_tokens_when_asked(
    tiny_model: LlamaForCausalLM, pipeline_factory: Callable[..., TransformersPipeline]
) -> None:
    pipeline = pipeline_factory(layer_ids=[1, NUM_LAYERS], logits=True, output_tokens=True)
    examples = make_examples([7, 40])
    outs = pipeline.forward(examples)
    for example, out in zip(examples, outs, strict=True):
        with torch.no_grad():
            ref = tiny_model(torch.tensor([example.token_ids])).logits[0]
        assert out["logits"].shape == (len(example.token_ids), VOCAB)
        torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-5)
        assert out["output_tokens"].dtype == torch.int32
        assert torch.equal(out["output_tokens"], out["logits"].argmax(-1).to(torch.int32))
        # the head ran, and the captured last slot is still the pre-norm output
        torch.testing.assert_close(tiny_model.lm_head(tiny_model.model.norm(out["hidden_states"][:, 1])), ref)


def test_output_tokens_alone_are_not_persisted_as_logits(
    pipeline_factory: Callable[..., TransformersPipeline],
) -> None:
    (out,) = pipeline_factory(output_tokens=True).forward(make_examples([9]))
    assert "logits" not in out and out["output_tokens"].shape == (9,)


def test_mean_reduce_averages_aux_slots_and_keeps_the_last(
    pipeline_factory: Callable[..., TransformersPipeline],
) -> None:
    examples = make_examples([21])
    (full,) = pipeline_factory(layer_ids=[1, 2, 3, NUM_LAYERS]).forward(examples)
    (reduced,) = pipeline_factory(layer_ids=[1, 2, 3, NUM_LAYERS], reduce="mean").forward(examples)
    assert reduced["hidden_states"].shape == (21, 2, 32)
    torch.testing.assert_close(reduced["hidden_states"][:, 0], full["hidden_states"][:, :3].mean(1))
    assert torch.equal(reduced["hidden_states"][:, 1], full["hidden_states"][:, 3])


def test_bad_inputs_name_the_problem(pipeline_factory: Callable[..., TransformersPipeline]) -> None:
    with pytest.raises(ConfigError, match=r"states.hidden_states.layers: \[9\] out of range"):
        pipeline_factory(layer_ids=[1, 9])  # ConfigError: the CLI's one line and exit 2
    with pytest.raises(ValueError, match="reduce: 'mean' needs at least two layers"):
        pipeline_factory(layer_ids=[2], reduce="mean")
    pipeline = pipeline_factory(max_seq_len=32)
    with pytest.raises(ValueError, match=r"set/0/0: 40 tokens; engine.max_seq_len allows 1..32"):
        pipeline.forward(make_examples([40]))
    with pytest.raises(ValueError, match=r"set/0/0: 0 tokens"):
        pipeline.forward([TokenizedExample(id="set/0/0", token_ids=[], loss_mask=[])])


def _config(model_dir: Path, **states: object) -> DataGenConfig:
    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(model_dir)},
            "datasets": [{"path": str(model_dir)}],
            "sync": {"path": str(model_dir / "out")},
            "states": states,
            "engine": {"device": "cpu", "batch_size": 2},
            "run": {"allowed_roots": [str(model_dir)]},
        }
    )


def test_from_config_loads_fp32_on_cpu(tiny_model: LlamaForCausalLM, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    pipeline = TransformersPipeline.from_config(_config(tmp_path, hidden_states={"layers": [1, NUM_LAYERS]}))
    assert pipeline.dtype == torch.float32 and pipeline.device.type == "cpu"
    assert (pipeline.num_layers, pipeline.hidden_size, pipeline.layer_ids) == (
        NUM_LAYERS,
        32,
        [1, NUM_LAYERS],
    )
    assert pipeline.batch_size == 2
    (out,) = pipeline.forward(make_examples([12]))
    assert out["hidden_states"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"states\.hidden_states\.layers"):
        TransformersPipeline.from_config(_config(tmp_path, hidden_states={"layers": [NUM_LAYERS + 1]}))


SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}
"""Two devices a CPU machine has: half the layers in memory, half offloaded (weights on the meta
device until accelerate's hooks load them for their forward), as on GPUs + CPU for a large verifier."""


def test_a_verifier_split_across_devices_captures_the_single_device_states(
    tiny_model: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specops.verifier import load_model

    tiny_model.save_pretrained(tmp_path)
    config = _config(tmp_path, hidden_states={"layers": [1, 3, NUM_LAYERS]}, logits=True)
    cpu = torch.device("cpu")
    split = load_model(
        config.verifier, dtype=torch.float32, device=cpu, allowed_roots=[str(tmp_path)], device_map=SPLIT
    )
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    assert split.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    held = [p for p in (cache_dir() / "offload").iterdir() if p.name.startswith(f"{os.getpid()}-")]
    assert len(held) == 1  # accelerate's offload folder (safetensors weights are read in place)
    examples = make_examples([12, 40, 7])
    single = TransformersPipeline.from_config(config).forward(examples)
    spread = TransformersPipeline(split, layer_ids=[1, 3, NUM_LAYERS], logits=True).forward(examples)
    for one, other in zip(single, spread, strict=True):
        assert torch.equal(one["hidden_states"], other["hidden_states"])
        assert torch.equal(one["logits"], other["logits"])
    del spread, split
    gc.collect()
    assert not any(p.exists() for p in held)  # removed with the model
    config.engine.device_map = "sequential"  # the config path hands the strategy to accelerate
    seen: list[object] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    placed = TransformersPipeline.from_config(config)
    assert seen == ["sequential"]
    assert torch.equal(placed.forward(examples)[1]["hidden_states"], single[1]["hidden_states"])
