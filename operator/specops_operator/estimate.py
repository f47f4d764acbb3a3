"""How many bytes an offline generation writes, estimated from its spec before any GPU is asked for.

Hidden states dominate: every stored token keeps `slots x hidden_size` values in the verifier's
dtype (an 8B Llama with EAGLE-3's 4 slots in bf16: 32 KiB per token), so a chat dataset of 200k
conversations needs TiBs. The estimate multiplies that by the examples (a dataset's `maxSamples`,
a split slice such as `train[:1000]`, or a table of common datasets) and by the tokens per example
(the stated `MEAN_TOKENS_PER_EXAMPLE`, capped at `processor.maxLength`). zstd is not counted:
activations compress by a few percent only. Pure (pydantic models in, numbers out), so the
operator's pre-flight check and a `specops plan` command give the same figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from specops.config import DatasetSource, VerifierConfig
from specops.engines.base import default_layer_ids
from specops_operator.api import Quantity, SpeculatorDataGenSpec, VerifierArchitecture

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

_SLICE = re.compile(r"^[^\[]+\[:(\d+)\]$")
_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][+-]?[0-9]+)?)([A-Za-z]*)$")


def quantity_bytes(value: Quantity) -> int:
    """`2Ti` -> 2199023255552 (binary and decimal suffixes and exponents, as Kubernetes reads them)."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.lstrip("+"))
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a storage quantity: {value!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2)])


def human(size: int) -> str:
    """Bytes in the largest binary unit that keeps one digit before the point: `6.3Ti`."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if size >= _SUFFIXES[suffix]:
            return f"{size / _SUFFIXES[suffix]:.1f}{suffix}"
    return f"{size}B"


@dataclass(frozen=True)
class StorageEstimate:
    """The bytes one offline generation stores, and the factors they come from."""

    bytes_per_token: int
    slots: int
    hidden_size: int
    dtype_bytes: int
    examples: int
    tokens_per_example: int

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.examples * self.tokens_per_example

    def describe(self) -> str:
        """The arithmetic, for a status message or `specops plan`."""
        return (
            f"{self.examples} examples x {self.tokens_per_example} tokens x {self.bytes_per_token} B/token "
            f"({self.slots} layers x {self.hidden_size} hidden x {self.dtype_bytes} B + {TOKEN_BYTES} B "
            f"token id and mask) = {human(self.total_bytes)}"
        )


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


def dtype_bytes(spec: SpeculatorDataGenSpec) -> int:
    """The stored dtype: engine.dtype, else verifier.dtype; auto = bf16 with GPUs, fp32 without."""
    dtype = spec.engine.dtype if spec.engine.dtype != "auto" else spec.verifier.dtype
    if dtype == "auto":
        dtype = "bfloat16" if spec.pod.resources.gpus() else "float32"
    return DTYPE_BYTES[dtype]


def bytes_per_token(spec: SpeculatorDataGenSpec, arch: VerifierArchitecture) -> tuple[int, int, int]:
    """(bytes per stored token, hidden-state slots, dtype bytes) for this capture."""
    states = spec.states
    slots = len(states.hidden_states.layers or default_layer_ids(arch.num_layers))
    if states.hidden_states.reduce == "mean":
        slots = min(slots, 2)  # the aux layers averaged into one, plus the last
    width = dtype_bytes(spec)
    per_token = slots * arch.hidden_size * width + TOKEN_BYTES
    if states.logits:
        per_token += arch.vocab_size * width
    if states.output_tokens:
        per_token += 4
    return per_token, slots, width


def estimate_storage(spec: SpeculatorDataGenSpec, arch: VerifierArchitecture) -> StorageEstimate | None:
    """The estimate for an offline generation, or None when a dataset's size is unknown."""
    rows = [dataset_rows(source) for source in spec.datasets]
    known = [r for r in rows if r is not None]
    if len(known) != len(rows):
        return None
    per_token, slots, width = bytes_per_token(spec, arch)
    return StorageEstimate(
        bytes_per_token=per_token,
        slots=slots,
        hidden_size=arch.hidden_size,
        dtype_bytes=width,
        examples=sum(known),
        tokens_per_example=min(spec.processor.max_length, MEAN_TOKENS_PER_EXAMPLE),
    )


KNOWN_PARAMETERS: dict[str, int] = {
    "meta-llama/llama-3.1-8b-instruct": 8_030_261_248,
    "meta-llama/llama-3.1-70b-instruct": 70_553_706_496,
    "meta-llama/llama-3.3-70b-instruct": 70_553_706_496,
    "meta-llama/llama-3.2-1b-instruct": 1_235_814_400,
    "meta-llama/llama-3.2-3b-instruct": 3_212_749_824,
    "qwen/qwen3-8b": 8_190_735_360,
    "qwen/qwen3-14b": 14_768_307_200,
    "qwen/qwen3-32b": 32_762_123_264,
    "qwen/qwen2.5-7b-instruct": 7_615_616_512,
    "huggingfacetb/smollm2-135m-instruct": 134_515_008,
}
"""Parameters of common verifiers (their model cards); their Hub weights are bf16 safetensors."""
HUB_WEIGHT_BYTES = 2
"""Bytes per parameter in those repositories (bf16), whatever dtype the run loads them in."""
HUB_EXTRA_BYTES = 64 * 2**20
"""Config, tokenizer and chat template files beside the weights (a Llama-3 tokenizer is ~9 MB)."""


def verifier_bytes(verifier: VerifierConfig) -> int | None:
    """The bytes a model cache needs for this Hub verifier, or None when it is not a known one."""
    parameters = KNOWN_PARAMETERS.get(verifier.name_or_path.lower())
    return None if parameters is None else parameters * HUB_WEIGHT_BYTES + HUB_EXTRA_BYTES
