"""Data-only contracts shared by the CLI, the workloads and the operator.

These pydantic models are the single source of truth: they parse YAML inside pods, validate
custom resources in the operator, and generate the CRD schemas. They must stay importable
without torch. Field names are snake_case in Python and camelCase on the wire (YAML and the
Kubernetes API accept both spellings on input; CRDs and dumps use camelCase).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake

from specops.data.presets import DatasetPreset, preset_fields

DType = Literal["auto", "float32", "bfloat16", "float16"]


class Contract(BaseModel):
    """Base for every config model: unknown fields are errors, camelCase aliases on the wire, and
    no number is infinite or NaN (`.inf` would pass any lower bound)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, value: Any, info: ValidationInfo) -> Any:
        """A number field takes no boolean (YAML's `true` is not 1) and no integer beyond 64
        bits, and no text holds a NUL byte: each would otherwise fail far from its field (in the
        API server, a seed, or as a traceback from the first path operation)."""
        if any("\x00" in v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)):
            raise ValueError("contains a NUL byte")
        kinds = _scalar_types(cls.model_fields[str(info.field_name)].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(f"must be a number, not the boolean {value}")
        if type(value) is int and int in kinds and not -(2**63) <= value < 2**63:
            raise ValueError(f"{value} does not fit in 64 bits")
        return value


def _scalar_types(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits (through Optional, unions and Annotated)."""
    if get_origin(annotation) in (Union, types.UnionType, Annotated):
        args = get_args(annotation)[:1] if get_origin(annotation) is Annotated else get_args(annotation)
        return set().union(*(_scalar_types(a) for a in args))
    return {annotation}


# --------------------------------------------------------------------------- data generation


class VerifierConfig(Contract):
    """The verifier (target) model whose hidden states train the draft."""

    name_or_path: Annotated[str, Field(min_length=1, max_length=512)]
    """Hugging Face model id or a local directory under an allowed root."""
    revision: Annotated[str, Field(max_length=128)] | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: DType = "auto"
    """Weights dtype; auto = bfloat16 on GPU, float32 on CPU."""
    gguf_file: Annotated[str, Field(max_length=256)] | None = None
    """GGUF file name inside `name_or_path`; the model is dequantized on load."""
    trust_remote_code: bool = False
    """Run modeling code shipped with the model. Off by default: it executes foreign code."""


class ColumnMapping(Contract):
    """Which columns of a dataset row hold the conversation; None = detect."""

    messages: Annotated[str, Field(max_length=128)] | None = None
    """Column with the turn list (ShareGPT `conversations`, OpenAI `messages`)."""
    role_key: Annotated[str, Field(max_length=64)] | None = None
    """Key of the speaker inside each turn (`from` or `role`)."""
    content_key: Annotated[str, Field(max_length=64)] | None = None
    """Key of the text inside each turn (`value` or `content`)."""
    text: Annotated[str, Field(max_length=128)] | None = None
    """Column holding plain text (no chat template, whole sequence trained)."""
    id: Annotated[str, Field(max_length=128)] | None = None
    """Column with a stable row id; default: the row number."""


class DatasetSource(Contract):
    """One input dataset: a named preset, a Hugging Face id, a local file or directory, or plain text files."""

    preset: DatasetPreset | None = None
    """A dataset upstream EAGLE-3 recipes train on, by name (sharegpt, ultrachat, magpie, perfectblend,
    ...): fills kind, path, split, name and columns (docs/data.md lists each); fields set beside it
    win, e.g. `maxSamples` or a local `path` holding the same rows. In a DataGenConfig a bare name
    (`datasets: [sharegpt]`) is short for `{preset: sharegpt}`."""
    kind: Literal["hf", "local", "text"] = "local"
    """hf = `datasets.load_dataset(id)`; local = json/jsonl/parquet/arrow path; text = .txt files."""
    path: Annotated[str, Field(max_length=1024)] = ""
    """HF dataset id (kind=hf) or a local path under an allowed root; required unless preset is set."""
    name: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9._-]*$")] | None = None
    """Label used in example ids (`<name>/<row>/<turn>`); default: derived from the path."""
    subset: Annotated[str, Field(max_length=128)] | None = None
    """HF dataset configuration name."""
    split: Annotated[str, Field(max_length=64)] = "train"
    """Split to read, e.g. `train` or `train_sft[:1000]`."""
    format: Literal["auto", "sharegpt", "openai", "text"] = "auto"
    """Row shape; auto detects ShareGPT `conversations[{from,value}]` or OpenAI `messages[{role,content}]`."""
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    """Column overrides for unusual layouts."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Take at most this many usable conversations (after the split; skipped rows do not count)."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """A preset's fields under the ones given (either spelling); columns merge key by key."""
        if not isinstance(data, dict) or not isinstance(data.get("preset"), str):
            return data
        given = {to_snake(str(k)): k for k in data}
        out = {k: v for k, v in preset_fields(data["preset"]).items() if k not in given}
        columns = data.get(given["columns"]) if "columns" in given else None
        if isinstance(columns, dict):
            named = {to_snake(str(k)) for k in columns}
            defaults = preset_fields(data["preset"]).get("columns", {})
            out[given["columns"]] = {**{k: v for k, v in defaults.items() if k not in named}, **columns}
        return {**data, **out}

    @model_validator(mode="after")
    def _has_a_path(self) -> Self:
        if not self.path:
            raise ValueError("path is required unless preset is set")
        return self


class ProcessorConfig(Contract):
    """How conversations become token ids and loss masks."""

    max_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Truncate sequences to this many tokens."""
    min_loss_tokens: Annotated[int, Field(ge=0)] = 1
    """Drop examples with fewer trainable (assistant) tokens than this."""
    assistant_only_loss: bool = True
    """Mask everything but assistant turns; off = train on every token."""
    add_generation_prompt: bool = False
    """Append the template's generation prompt after the last turn."""


class RegenerateConfig(Contract):
    """Replace the dataset's assistant turns with the verifier's own greedy answers first.

    A draft is judged on the verifier's own text, so training on the verifier's answers (to the
    dataset's prompts) matches what it will see when serving; EAGLE-3 and HASS train that way.
    """

    max_new_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 512
    """Longest answer per turn; an answer cut here ends the conversation without its end-of-turn
    token (the draft is not taught to stop where the verifier did not)."""
    max_turns: Annotated[int, Field(ge=1)] | None = None
    """Regenerate at most this many assistant turns per conversation (later turns are dropped,
    they answered the old text); unset = every turn."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Prompts decoded together (decoding is memory-bound: larger batches are faster per token)."""
    path: Annotated[str, Field(max_length=1024)] | None = None
    """Directory for the regenerated conversations (JSONL, reused by reruns); default:
    `<sync.path>/regenerated` for disk sinks."""


class HiddenStatesConfig(Contract):
    """Which verifier layers to capture."""

    layers: list[Annotated[int, Field(ge=0, le=1024)]] | None = Field(default=None, max_length=16)
    """Layer ids; slot k = input of decoder layer k, id == num_layers = final output before the
    final norm. Default: EAGLE-3's [2, N//2, N-3, N]."""
    reduce: Literal["none", "mean"] = "none"
    """none = keep [S, L, H]; mean = average the aux layers into one slot (keeps the last)."""


class StatesConfig(Contract):
    """What each example persists besides token ids."""

    hidden_states: HiddenStatesConfig = Field(default_factory=HiddenStatesConfig)
    """Which verifier layers each example stores; their count and the verifier's hidden size set the bytes per token."""
    logits: bool = False
    """Persist full verifier logits [S, V] (large; the trainer recomputes them from the last slot)."""
    output_tokens: bool = False
    """Persist the verifier's greedy next token per position."""


class EngineConfig(Contract):
    """The inference engine that runs the verifier forward."""

    kind: Literal["transformers", "vllm"] = "transformers"
    """transformers = a plain forward pass (any device, the default); vllm = vLLM's prefill with hidden-state
    capture (much faster on GPUs; needs the `vllm` extra)."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    """Maximum sequences per forward."""
    max_tokens_per_batch: Annotated[int, Field(ge=16)] = 16384
    """Maximum padded tokens per forward; batches are grouped by length."""
    dtype: DType = "auto"
    """Compute dtype of the verifier forward; auto = bfloat16 on GPU, float32 on CPU. The stored hidden
    states have this dtype (2 bytes per value for bfloat16/float16, 4 for float32)."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", max_length=16)] = "auto"
    """auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N."""
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = None
    """Transformers only: spread the verifier's layers over every GPU the pod sees (accelerate's
    placement strategies), for verifiers larger than one GPU; unset = the whole model on `device`.
    The vLLM engine splits with tensorParallelSize instead."""
    max_seq_len: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Longest sequence the engine accepts, in tokens (default 2048); sequences are cut to the smaller of
    this and processor.maxLength. Raise both for long-context data (memory grows with it)."""
    seed: int = 0
    """Random seed handed to the engine (default 0); captures are greedy forward passes, so it does not
    change which tokens are stored."""
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    """vLLM only: GPUs one verifier copy is split over (default 1); raise it when the verifier does not
    fit one GPU."""
    data_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    """vLLM only: verifier copies in this process, each on its own GPU(s) (default 1)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.85
    """vLLM only: fraction of GPU memory vLLM may take for weights and KV cache (default 0.85); lower it
    when other processes share the GPU."""
    handoff: Literal["memory", "file"] = "memory"
    """vLLM only: pass hidden states in memory (our connector) or through files."""


class SyncConfig(Contract):
    """Where generated examples go: disk shards, a local queue, or a ZeroMQ broker."""

    kind: Literal["disk", "mpqueue", "zmq"] = "disk"
    """disk = safetensors shards under sync.path (offline; resumable); mpqueue = a bounded queue to a trainer
    on this machine; zmq = a broker at sync.url that streams to trainers on other machines."""
    path: Annotated[str, Field(max_length=1024)] | None = None
    """Directory for disk shards (kind=disk) or the queue directory (kind=mpqueue; best on tmpfs
    such as /dev/shm)."""
    shard_size: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    """Examples per shard file."""
    compression: Literal["none", "zstd"] = "none"
    """Shard compression: none (default) or zstd (smaller shards for more CPU time to write and read)."""
    digest: Literal["xxh3-128", "sha256"] = "xxh3-128"
    """Checksum recorded per disk shard to catch torn or corrupted files: xxh3-128 (fast,
    non-cryptographic) or sha256 (what `sha256sum` prints, but slower to write than the disk on
    CPUs without SHA extensions)."""
    queue_size: Annotated[int, Field(ge=1, le=65536)] = 16
    """Bounded queue length (mpqueue) / producer in-flight window (zmq)."""
    url: Annotated[str, Field(max_length=512)] | None = None
    """Broker address for zmq, e.g. tcp://specops-broker:5555."""
    max_broker_bytes: Annotated[int, Field(ge=1 << 20)] = 2 << 30
    """zmq: bytes the broker may hold at once."""
    curve_key_dir: Annotated[str, Field(max_length=1024)] | None = None
    """zmq: directory with CURVE keys (`producer.key_secret`, `broker.key`, and `consumer.key` for
    direct ranks); unset = no encryption."""
    claim_ranges: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """zmq: generators claim ranges of the input (split into this many) from the broker until none
    is left, so a dead generator's unfinished range is regenerated by another; unset = each
    generator produces its own run slice (run.shard_index of run.num_shards)."""
    broker_timeout_s: Annotated[float, Field(gt=0.0)] | None = 1800.0
    """zmq: a generator fails (instead of reconnecting forever) when the broker has said nothing
    for this long, so a Job whose broker is gone for good ends; what it wrote but the broker never
    acked is produced again by its retry. null = wait indefinitely."""

    @model_validator(mode="after")
    def _kind_needs(self) -> Self:
        if self.kind in ("disk", "mpqueue") and not self.path:
            raise ValueError(f"sync.path is required when sync.kind is '{self.kind}'")
        if self.kind == "zmq" and not self.url:
            raise ValueError("sync.url is required when sync.kind is 'zmq'")
        if self.claim_ranges is not None and self.kind != "zmq":
            raise ValueError("sync.claim_ranges needs sync.kind 'zmq' (the broker hands out the ranges)")
        return self


class RunConfig(Contract):
    """How this process takes part in a run (set by the CLI, the operator or `specops run`)."""

    num_workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Local worker processes to spawn (each takes one slice)."""
    shard_index: Annotated[int, Field(ge=0)] = 0
    """This worker's slice of the input (Kubernetes: the Job completion index)."""
    num_shards: Annotated[int, Field(ge=1)] = 1
    """Number of disjoint input slices."""
    allowed_roots: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=32)
    """Local paths must resolve under one of these; empty = the current directory and the
    SpecOps cache directory only."""

    @model_validator(mode="after")
    def _slice_in_range(self) -> Self:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"run.shard_index={self.shard_index} must be < run.num_shards={self.num_shards}")
        return self


class ProgressMetricsConfig(Contract):
    """A process's live progress as Prometheus metrics, served while it runs: each trainer rank's
    (step, loss and accuracy per TTT step, tokens/s, ETA; specops.train.progress), each
    generator's (examples written/stored/failed, rates, total, ETA; specops.generate_progress)."""

    port: Annotated[int, Field(ge=0, le=65000)] | None = None
    """Port of local rank (or local worker) 0; local rank r serves port + r. 0 = any free port; null = off."""
    host: Annotated[str, Field(min_length=1, max_length=255)] = "127.0.0.1"
    """Address to bind; loopback unless asked (in pods the operator binds the pod's IP)."""

    def port_of(self, index: int) -> int | None:
        """The port of local rank or worker `index`: `port + index`; 0 stays 0 (any free port),
        None stays None (off)."""
        return self.port + index if self.port else self.port


class DataGenConfig(Contract):
    """A data generation run: sources -> chat/loss mask -> verifier forward -> sink."""

    verifier: VerifierConfig
    """The model whose hidden states are captured (the one the draft will speed up)."""
    datasets: list[DatasetSource] = Field(min_length=1, max_length=64)
    """Conversation sources, read in order (1 to 64): Hub datasets, local files or text; each may cap its
    rows with maxSamples."""
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    """Inline Jinja chat template; default: the verifier tokenizer's own."""
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)
    """Tokenization: sequence length and which tokens carry loss."""
    regenerate: RegenerateConfig | None = None
    """Set to answer the prompts with the verifier before capturing hidden states (off: train on
    the dataset's own answers)."""
    states: StatesConfig = Field(default_factory=StatesConfig)
    """What each stored example holds besides token ids (layers, logits, greedy tokens)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """The engine that runs the verifier forward (Transformers or vLLM), its batch sizes and device."""
    sync: SyncConfig
    """Where examples go: disk shards (offline), a local queue or a ZeroMQ broker (online)."""
    run: RunConfig = Field(default_factory=RunConfig)
    """This process's part of the run: local workers, its input slice, allowed path roots."""
    metrics: ProgressMetricsConfig = Field(default_factory=lambda: ProgressMetricsConfig())
    """Live progress as Prometheus metrics while generating (the operator sets it in pods)."""

    @property
    def sequence_limit(self) -> int:
        """Longest sequence an example may have: `processor.max_length`, never beyond the engine's."""
        return min(self.processor.max_length, self.engine.max_seq_len)

    @field_validator("datasets", mode="before")
    @classmethod
    def _preset_names(cls, value: Any) -> Any:
        """`datasets: [sharegpt]` is short for `[{preset: sharegpt}]`."""
        if isinstance(value, list):
            return [{"preset": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _regenerate_has_a_home(self) -> Self:
        if self.regenerate is None:
            return self
        if self.regenerate.path is None and self.sync.kind != "disk":
            raise ValueError(f"regenerate.path is required when sync.kind is '{self.sync.kind}'")
        if self.sync.claim_ranges is not None:
            raise ValueError(
                "regenerate: not supported with sync.claim_ranges; leave claim_ranges unset so each "
                "generator regenerates its own run slice"
            )
        return self


# --------------------------------------------------------------------------- training


class DraftConfig(Contract):
    """The draft (speculator) architecture."""

    algorithm: Literal["eagle3", "hass"] = "eagle3"
    """eagle3 (default) trains on the verifier's next-token targets; hass adds distillation of the
    verifier's top-k distribution (see hassTopk); both write the same EAGLE-3 model for vLLM."""
    num_layers: Annotated[int, Field(ge=1, le=8)] = 1
    """Decoder layers in the draft (default 1, as EAGLE-3 uses); more layers predict better but draft slower."""
    draft_vocab_size: Annotated[int, Field(ge=16, le=1_048_576)] = 32000
    """Tokens the draft can propose; clipped to the verifier vocab."""
    layer_style: Literal["llama", "qwen3"] = "llama"
    """Decoder layers of the draft; vLLM serves both (`qwen3` adds per-head q/k norms)."""
    hidden_size: Annotated[int, Field(ge=16, le=65536)] | None = None
    """The draft's width; unset = the verifier's. A different width records the verifier's as
    `target_hidden_size` (what `fc` reads), and the draft then trains its own embedding and lm_head."""
    norm_before_residual: bool = False
    """Use the normalized hidden state, not the raw one, as the first layer's residual (default off); must match
    any checkpoint you convert or continue from."""
    speculative_tokens: Annotated[int, Field(ge=1, le=16)] = 3
    """k written to the proposal method (what vLLM drafts per step)."""
    init_from_verifier: bool = False
    """Start the decoder layers from the verifier's last layers and `fc` from passing the deepest
    auxiliary hidden state through, instead of random weights (fewer steps to the same accuracy;
    see docs/training.md)."""
    init_from: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Fine-tune an existing speculator (a local directory under an allowed root, or a Hub id;
    SpecOps- or upstream `speculators`-trained): its weights and its d2t/t2d vocabulary mapping
    are the start, the optimizer starts fresh. Its architecture, vocabulary sizes, auxiliary
    layers and verifier must match this run's, else the run is refused; a run that resumes from
    its own checkpoint ignores it."""
    init_from_revision: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The Hub revision (branch, tag or commit) of a Hub id initFrom; unset = the default branch.
    Needs a Hub id initFrom: a local directory has no revisions, and one is refused."""
    norm_before_fc: bool = False
    """One RMSNorm over the concatenated auxiliary hidden states before `fc` (upstream's
    `norm_before_fc`, tensor `input_norm.weight`; default off). vLLM serves it."""
    fc_norm: bool = False
    """One RMSNorm per auxiliary hidden state before they are concatenated into `fc` (upstream's
    `fc_norm`; default off); excludes normBeforeFc. vLLM serves it."""
    norm_output: bool = False
    """Pass the last layer's output through the final norm before lm_head AND feed that normed state
    to the next drafted position (upstream's `norm_output`, "Eagle 3.1"; default off: the next step
    reads the pre-norm state). vLLM serves it."""
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = Field(
        default=None, max_length=8
    )
    """Attention of each draft layer, one entry per numLayers, all the same type (vLLM cannot serve
    a mix): full_attention sees every earlier position, sliding_attention only the last
    slidingWindow (the position itself included); unset = all full_attention."""
    sliding_window: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    """Positions a sliding_attention layer sees; required exactly when layerTypes has one."""

    @model_validator(mode="after")
    def _one_start(self) -> Self:
        if self.init_from is not None and self.init_from_verifier:
            raise ValueError(
                "draft.initFrom and draft.initFromVerifier both set the starting weights; use one"
            )
        return self

    @model_validator(mode="after")
    def _architecture_fits(self) -> Self:
        broken = [message for _, message, holds in DRAFT_RULES if not holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


DRAFT_RULES: tuple[tuple[str, str, Callable[[DraftConfig], bool]], ...] = (
    (
        "!has({d}.initFromRevision) || has({d}.initFrom)",
        "draft.initFromRevision is the Hub revision of draft.initFrom; set initFrom to a Hub id",
        lambda d: d.init_from_revision is None or d.init_from is not None,
    ),
    (
        "!has({d}.normBeforeFc) || !has({d}.fcNorm) || !({d}.normBeforeFc && {d}.fcNorm)",
        "draft.normBeforeFc and draft.fcNorm exclude each other (one norm before fc, or one per state)",
        lambda d: not (d.norm_before_fc and d.fc_norm),
    ),
    (
        "!has({d}.layerTypes) || size({d}.layerTypes) == {d}.numLayers",
        "draft.layerTypes needs one entry per draft layer (draft.numLayers)",
        lambda d: d.layer_types is None or len(d.layer_types) == d.num_layers,
    ),
    (
        "has({d}.slidingWindow) == (has({d}.layerTypes) && {d}.layerTypes.exists(t, t == 'sliding_attention'))",
        "draft.slidingWindow is required exactly when draft.layerTypes has a sliding_attention layer",
        lambda d: (d.sliding_window is not None) == ("sliding_attention" in (d.layer_types or [])),
    ),
    (
        "!has({d}.layerTypes) || {d}.layerTypes.all(t, t == {d}.layerTypes[0])",
        "draft.layerTypes mixes full_attention and sliding_attention, which vLLM 0.32 cannot serve "
        "(two KV cache groups): give every layer the same type",
        lambda d: len(set(d.layer_types or [])) <= 1,
    ),
    (
        "!has({d}.slidingWindow) || {d}.slidingWindow >= {d}.speculativeTokens - 1",
        "draft.slidingWindow must reach back over the draft.speculativeTokens - 1 positions drafted "
        "before the last one (at inference the window moves with each drafted token)",
        lambda d: d.sliding_window is None or d.sliding_window >= d.speculative_tokens - 1,
    ),
)
"""DraftConfig's cross-field rules: (CEL over the draft object `{d}`, message, the pydantic check);
the operator emits them into the SpeculatorTraining CRD."""


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
"""An Adam moment decay: 1 or more never forgets (or diverges), below 0 is not a decay."""


class OptimConfig(Contract):
    """AdamW; every field is bounded, so a bad value fails at validation, before anything loads."""

    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    """Peak learning rate of AdamW (default 1e-4), reached after warmupSteps and then decayed by schedule."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Decoupled: each step scales the weights by 1 - lr x weight_decay."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW moment decays (beta1, beta2), each in [0, 1) (default [0.9, 0.95])."""
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-8
    """AdamW denominator epsilon (default 1e-8); raise it only if low-precision updates blow up."""
    grad_clip: Annotated[float, Field(gt=0.0, le=1e6)] = 0.5
    """Gradients are rescaled so their global L2 norm is at most this (default 0.5)."""
    warmup_steps: Annotated[int, Field(ge=0, le=1_000_000_000)] = 0
    """Optimizer steps of linear warmup from 0 to lr (default 0)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning rate after warmup: cosine (default) or linear decay to 0 at the last step, or constant."""


class TrainDataConfig(Contract):
    """Where training examples come from."""

    kind: Literal["disk", "speculators", "mpqueue", "zmq"] = "disk"
    """disk = SpecOps shards; speculators = upstream hs_{i}.safetensors; zmq = broker stream."""
    path: Annotated[str, Field(max_length=1024)] | None = None
    """disk/speculators: the directory with the generated examples (required for those kinds); mpqueue:
    the queue directory."""
    url: Annotated[str, Field(max_length=512)] | None = None
    """zmq: the broker address, e.g. tcp://specops-broker:5555 (required for kind zmq)."""
    curve_key_dir: Annotated[str, Field(max_length=1024)] | None = None
    """zmq: directory with CURVE keys (`consumer.key_secret`, `broker.key`, and `producer.key` for
    `direct`); unset = no encryption."""
    stall_timeout_s: Annotated[float, Field(gt=0.0)] | None = 1800.0
    """Streams: fail (instead of waiting forever) when no example arrives for this long while
    the stream has not ended; null = wait for producers indefinitely."""
    direct: bool = False
    """zmq: generators send this rank's examples straight to it (the broker still decides who gets
    what), so each byte crosses the network once instead of twice. Generators must be able to
    connect to `direct_host`:`direct_port`; behind NAT, leave it off (the broker relays)."""
    direct_host: Annotated[str, Field(max_length=255)] | None = None
    """zmq direct: the address generators reach this rank at (in Kubernetes the pod IP); default:
    this host's address on the route to the broker."""
    direct_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """zmq direct: the port to receive examples on; 0 = any free port."""
    cache_path: Annotated[str, Field(max_length=1024)] | None = None
    """Stream-then-cache: tee the first streamed epoch into a DiskStore here."""
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Conversations held out from training (by a hash of the conversation id and `seed`): the
    validation loss and every evaluation use only these; 0 = none (no validation, no evaluation)."""
    prefetch: Annotated[int, Field(ge=0, le=64)] = 2
    """Batches read and packed ahead by a background thread (0 = inline). A thread, not worker
    processes, so tensors never cross a process boundary."""
    shuffle: bool = True
    """Reshuffle partitions (and examples within a window of them) every epoch."""
    max_validation_examples: Annotated[int, Field(ge=0)] = 256
    """Held-out examples a validation pass uses (streams keep them in memory; stores read only the
    shards that hold them)."""
    vocab_from: Annotated[str, Field(max_length=1024)] | None = None
    """DiskStore directory whose token counts choose the draft vocabulary; default: the training
    data's own (for a stream: its first window, see vocab_window_tokens)."""
    vocab_window_tokens: Annotated[int, Field(ge=1, le=1 << 30)] = 131072
    """Streams without vocab_from: each rank holds its first streamed examples in memory until they
    reach this many tokens, the loss-masked token counts of every rank's window (summed, so all ranks
    agree) choose the draft vocabulary, and those examples are then trained on like any other (no
    window with draft.initFrom, whose vocabulary mapping is kept). Memory:
    tokens x the bytes per token of the hidden states (an 8B verifier with 4 slots in bf16: 32 KiB)."""
    max_dropped_shards: Annotated[int, Field(ge=0, le=1_000_000)] = 8
    """DiskStore shards (data.kind disk, or a stream's cache) a rank may drop because they fail
    their checks (missing, cut short, a digest or header that does not match) before the run
    fails with exit 3; each dropped shard is logged and its examples are skipped."""

    @model_validator(mode="after")
    def _kind_needs(self) -> Self:
        if self.kind in ("disk", "speculators") and not self.path:
            raise ValueError(f"data.path is required when data.kind is '{self.kind}'")
        if self.kind == "speculators" and "max_dropped_shards" in self.model_fields_set:
            raise ValueError(
                "data.max_dropped_shards applies to SpecOps shards; upstream hs files carry no digests "
                "to check (data.kind is 'speculators')"
            )
        if self.kind == "zmq" and not self.url:
            raise ValueError("data.url is required when data.kind is 'zmq'")
        return self


def _each_once(items: list[str]) -> list[str]:
    """A list that is a set (`x-kubernetes-list-type: set` in the CRD): no value twice."""
    twice = sorted({item for item in items if items.count(item) > 1})
    if twice:
        raise ValueError(f"lists {', '.join(twice)} more than once")
    return items


class TrainConfig(Contract):
    """A training run: GeneratedDataset -> draft with TTT steps -> speculators checkpoint."""

    verifier: VerifierConfig
    """The verifier the draft is trained for (the same model that generated the data)."""
    data: TrainDataConfig
    """Where training examples come from: shards on disk, upstream speculators data, or a stream."""
    draft: DraftConfig = Field(default_factory=DraftConfig)
    """The draft model's architecture and algorithm."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer (AdamW) and learning-rate schedule."""
    output_dir: Annotated[str, Field(min_length=1, max_length=1024)]
    """Directory for checkpoints, `final`, `best`, metrics.jsonl and logs; rerunning on it resumes."""
    ttt_steps: Annotated[int, Field(ge=1, le=16)] = 3
    """Training-time-test steps unrolled per position."""
    ttt_step_loss_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Weight of step i is decay**i."""
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    """Passes over the training data (default 1); ignored when maxSteps is set."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    tokens_per_step: Annotated[int, Field(ge=16)] = 8192
    """Packed token budget per optimizer step per rank."""
    max_seq_len: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Longest training row, in tokens (default 2048); longer examples are cut. Rows hold
    min(maxSeqLen, tokensPerStep) tokens."""
    seed: int = 0
    """Seed for weight initialization and shuffling (default 0); the same seed and data give the same run."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Multi-rank strategy under torchrun: ddp (default) replicates the draft, fsdp shards it (for drafts
    too large for one GPU)."""
    collective_timeout_s: Annotated[float, Field(ge=60.0, le=604_800.0)] = 1800.0
    """Multi-rank only: how long a rank waits in a collective (gradient all-reduce, checkpoint barrier)
    before the process group aborts the run (default 1800 s). On streams it is raised to at least
    `data.stallTimeoutS` + 60 s, so a rank waiting for data reports the stall itself instead of its
    peers' watchdog killing it first."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 500
    """Write a resumable checkpoint every this many optimizer steps (default 500) and at the end."""
    eval_every: Annotated[int, Field(ge=1)] = 500
    """Compute validation metrics every this many optimizer steps (default 500) and at the end."""
    log_every: Annotated[int, Field(ge=1)] = 10
    """Log training metrics (loss, learning rate, throughput) to metrics.jsonl every this many optimizer steps (default 10)."""
    report_to: Annotated[
        list[Literal["tensorboard", "wandb", "mlflow", "trackio"]], AfterValidator(_each_once)
    ] = Field(default_factory=list, max_length=4, json_schema_extra={"x-kubernetes-list-type": "set"})
    """Experiment trackers that also get every logged step and evaluation (rank 0), plus the resolved
    config once; any subset. Each needs its package (`pip install 'specops[tracking]'`, in the
    workload image) and takes its credentials and destination from its own environment variables
    (docs/training.md); metrics.jsonl is written either way."""
    metrics: ProgressMetricsConfig = Field(default_factory=lambda: ProgressMetricsConfig())
    """Live progress as Prometheus metrics while the run goes on (the operator sets it in pods)."""
    run_name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """The run's name in the trackers; default: the output directory's name."""
    run_tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    """Tags on the trackers' run (W&B tags, MLflow tags)."""
    hass_topk: Annotated[int, Field(ge=1, le=1024)] = 10
    """HASS only: top-k of the verifier distribution distilled."""
    hass_topk_weight: Annotated[float, Field(ge=0.0)] = 1.0
    """HASS only: weight of the top-k distillation term added to the forward KL."""
    batching: Literal["packed", "padded"] = "packed"
    """packed = documents share rows up to tokens_per_step; padded = one example per row (baseline)."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda)$")] = "auto"
    """auto = cuda when available (each rank takes cuda:LOCAL_RANK), else cpu."""
    resume: Literal["auto", "never"] = "auto"
    """auto = continue from the newest complete checkpoint in output_dir; never = refuse a used output_dir."""
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = 2
    """Step checkpoints kept under output_dir/checkpoints (older ones are deleted)."""
    allowed_roots: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=32)
    """Local paths must resolve under one of these; empty = see RunConfig.allowed_roots."""

    def process_group_timeout_s(self) -> float:
        """`collective_timeout_s`, raised above a stream's stall timeout (see that field)."""
        stall = self.data.stall_timeout_s if self.data.kind in ("mpqueue", "zmq") else None
        return self.collective_timeout_s if stall is None else max(self.collective_timeout_s, stall + 60.0)

    @model_validator(mode="after")
    def _init_from_keeps_its_vocabulary(self) -> Self:
        if self.draft.init_from is not None and self.data.vocab_from is not None:
            raise ValueError(
                "data.vocabFrom: draft.initFrom keeps the loaded speculator's vocabulary mapping; "
                "leave vocabFrom unset"
            )
        return self

    @model_validator(mode="after")
    def _streams_need_max_steps(self) -> Self:
        if self.data.kind in ("mpqueue", "zmq") and self.max_steps is None:
            raise ValueError(
                f"max_steps is required when data.kind is '{self.data.kind}' (a stream has no known length)"
            )
        return self


# --------------------------------------------------------------------------- YAML helpers

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


def format_validation_error(
    err: ValidationError, source: str, spelled: dict[tuple[Any, ...], str] | None = None
) -> str:
    """One line per problem: `source: field.path: message`, each key as the input spelled it
    (`spelled`: snake_case path -> the key in the file; see `_snake_keys`) and list positions as
    `[i]`, as Kubernetes and the API server name them (`spec.optim.betas[0]`)."""
    problems: dict[str, list[str]] = {}
    for item in err.errors():
        path = item["loc"]
        loc = ""
        for i, part in enumerate(path):
            if isinstance(part, int):
                loc += f"[{part}]"
            elif not _UNION_TAG.match(part):
                loc += ("." if loc else "") + (spelled or {}).get(tuple(path[: i + 1]), part)
        loc = loc or "<root>"
        msg = item["msg"]
        ctx = item.get("ctx") or {}
        if "expected" in ctx:
            msg = f"{msg} (allowed: {ctx['expected']})"
        problems.setdefault(loc, []).append(msg)
    lines = []
    for loc, messages in problems.items():
        # A union (e.g. a quantity: integer or string) reports each branch; the branch whose type
        # the value has says what is wrong with it.
        meant = [m for m in messages if not m.startswith("Input should be a valid ")] or messages
        lines.append(f"{source}: {loc}: {' or '.join(dict.fromkeys(meant))}")
    return "\n".join(lines)


_UNION_TAG = re.compile(r"^(constrained-)?(int|str|float|bool|bytes)$|^[a-z]+(-[a-z]+)*\[.*\]$")
"""Path parts pydantic adds for the branches of a union (`constrained-int`, `str`, ...): not fields."""


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (a 452-byte alias bomb expands to gigabytes) and without duplicate
    keys (where the last would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only


def apply_overrides(
    data: dict[str, Any], overrides: dict[str, Any], spelled: dict[tuple[Any, ...], str] | None = None
) -> dict[str, Any]:
    """Set dotted keys (`engine.batch_size`, `datasets.0.maxSamples`) in nested data, creating
    levels as needed; a number indexes a list (its length appends an entry). Keys may be camelCase
    or snake_case; `spelled` records how each was typed, for messages."""
    out: dict[str, Any] = {**data}
    for dotted, value in overrides.items():
        typed = dotted.split(".")
        parts: list[Any] = [int(p) if p.isdigit() else to_snake(p.replace("-", "_")) for p in typed]
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if spelled is not None and (last or tuple(parts[: i + 1]) not in spelled):
                spelled[tuple(parts[: i + 1])] = typed[i]
            if isinstance(part, int):
                if not isinstance(node, list) or part > len(node):
                    have = len(node) if isinstance(node, list) else 0
                    where = ".".join(typed[:i])
                    raise ConfigError(
                        f"{where}.{part}: {where} has {have} entries (index {have} appends one)"
                    )
                if part == len(node):
                    node.append({})
                child = value if last else node[part]
            else:
                child = value if last else node.get(part)
            if not last:
                if child is not None and not isinstance(child, dict | list):
                    where = ".".join(typed[: i + 1])
                    raise ConfigError(
                        f"{where} is {child!r}, not a section: write it as a mapping to set its fields"
                    )
                want_list = isinstance(parts[i + 1], int)
                if want_list:
                    child = list(child) if isinstance(child, list) else []
                else:
                    child = {**child} if isinstance(child, dict) else {}
            node[part] = child
            node = child
    return out


def load_config(
    model: type[C],
    source: str | Path | dict[str, Any],
    overrides: dict[str, Any] | None = None,
    label: str = "<dict>",
) -> C:
    """Parse a YAML file (or dict, called `label` in messages) into `model`, applying dotted
    overrides; errors name the field as spelled."""
    if isinstance(source, dict):
        data = source
    else:
        label = str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read config: {exc.strerror}") from None
        try:
            data = _load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{label}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{label}: top level must be a mapping, got {type(data).__name__}")
    spelled: dict[tuple[Any, ...], str] = {}
    data = apply_overrides(_snake_keys(data, label, spelled), overrides or {}, spelled)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, label, spelled)) from None


def dump_config(config: BaseModel) -> str:
    """YAML with camelCase keys, the form pods and CRs read."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def _snake_keys(
    data: Any, label: str, spelled: dict[tuple[Any, ...], str], path: tuple[Any, ...] = ()
) -> Any:
    """Normalize camelCase keys so snake_case overrides land on the same key, recording how
    the input spelled each one (for messages) and refusing two spellings of one field.

    Workload configs hold no free-form maps, so every key is a field name.
    """
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            key = to_snake(str(k))
            where = (*path, key)
            if key in out:
                field = ".".join(spelled.get(where[: i + 1], str(p)) for i, p in enumerate(where[:-1]))
                raise ConfigError(
                    f"{label}: {field + '.' if field else ''}{spelled[where]} and {k} are the same "
                    "field set twice; keep one"
                )
            spelled[where] = str(k)
            out[key] = _snake_keys(v, label, spelled, where)
        return out
    if isinstance(data, list):
        return [_snake_keys(v, label, spelled, (*path, i)) for i, v in enumerate(data)]
    return data


# --------------------------------------------------------------------------- export targets

HUB_REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
"""A Hub model repository to push to: ORG/NAME."""
OBJECT_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"
"""An object-store prefix: s3://BUCKET[/PREFIX] (S3 bucket naming; any S3-compatible store)."""
BRANCH_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
ENDPOINT_PATTERN = r"^https?://[^\s/]+(/[^\s]*)?$"


class HubTarget(Contract):
    """A Hugging Face Hub model repository the trained speculator is uploaded to."""

    repo: Annotated[str, Field(max_length=200, pattern=HUB_REPO_PATTERN)]
    """Repository ORG/NAME, created when missing; the Hub (or `HF_ENDPOINT`) decides the URL."""
    private: bool = False
    """Create the repository private (an existing repository keeps its visibility)."""
    revision: Annotated[str, Field(max_length=200, pattern=BRANCH_PATTERN)] | None = None
    """Existing branch to commit to; default: main."""


class ExportConfig(Contract):
    """Where a trained speculator goes besides its output directory: one Hub repository or one
    object-store prefix. Credentials never appear here: HF_TOKEN, or the AWS_* variables."""

    hub: HubTarget | None = None
    """Upload config, weights and a generated model card to this Hub repository."""
    uri: Annotated[str, Field(max_length=1024, pattern=OBJECT_URI_PATTERN)] | None = None
    """Upload the same files under this object-store prefix instead, e.g. s3://bucket/drafts/llama."""
    endpoint_url: Annotated[str, Field(max_length=512, pattern=ENDPOINT_PATTERN)] | None = None
    """S3-compatible endpoint for `uri` (MinIO, on-premises stores); default: AWS S3 or
    `AWS_ENDPOINT_URL`."""
