"""bench/gpu.py (`make gpu-check`): the skip line without CUDA, and its flex_attention path of the
draft attention against the one training uses (eager flex_attention on CPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from specops.models.eagle3 import StepKV, ttt_attention

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flex_attention's tracing imports the mask function's module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the bench runs for real")
def test_without_cuda_it_prints_a_skip_line_and_exits_0() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "gpu" and "no CUDA device" in line["skipped"]


def test_the_flex_attention_path_equals_the_training_attention() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    bench = load_bench()
    bench.FLEX = flex_attention
    torch.manual_seed(0)
    b, heads, kv_heads, t, d = 2, 4, 2, 40, 16
    kv = StepKV()
    kv.add(torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d))
    kv.extending = False
    for _ in range(2):  # two later TTT steps: diagonal keys
        kv.add(torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d))
    documents = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    positions = torch.arange(t)
    allowed = (documents[:, :, None] == documents[:, None, :]) & (positions[:, None] >= positions[None, :])
    q = torch.randn(b, heads, t, d)
    expected = ttt_attention(q, kv, allowed, 0.25, True)
    torch.testing.assert_close(bench.flex_ttt_attention(q, kv, allowed, 0.25, True), expected)
