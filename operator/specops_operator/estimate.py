"""The operator's storage pre-flight: a DataGen spec's stored bytes, by `specops.plan`'s arithmetic.

What is the operator's own: reading Kubernetes quantities, and the dtype a spec captures in (bfloat16
when its pods ask for GPUs). Everything else is `specops.plan`, which `specops plan` uses too.
"""

from __future__ import annotations

import re

from specops.config import VerifierConfig
from specops.plan import StorageEstimate, VerifierShape, stored_dtype
from specops.plan import estimate_storage as estimate_from_spec
from specops_operator.api import Quantity, SpeculatorDataGenSpec, VerifierArchitecture

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


def spec_dtype(spec: SpeculatorDataGenSpec) -> str:
    """The stored dtype of a spec's capture: its pods' GPUs decide what `auto` means."""
    return stored_dtype(spec.engine.dtype, spec.verifier.dtype, gpu=spec.pod.resources.gpus() > 0)


def shape_of(arch: VerifierArchitecture, source: str) -> VerifierShape:
    return VerifierShape(arch.num_layers, arch.hidden_size, arch.vocab_size, source)


def estimate_storage(spec: SpeculatorDataGenSpec, arch: VerifierArchitecture) -> StorageEstimate | None:
    """The estimate for an offline generation, or None when a dataset's size is unknown."""
    limit = min(spec.processor.max_length, spec.engine.max_seq_len)
    return estimate_from_spec(spec.datasets, limit, spec.states, shape_of(arch, "spec"), spec_dtype(spec))


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
