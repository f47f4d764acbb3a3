"""Training state on disk: safetensors + JSON round trips that resume bit-exactly, and clear errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from specops.config import OptimConfig
from specops.train.checkpoint import rng_state, set_rng_state
from specops.train.optim import build_optimizer, lr_at
from specops.train.state_io import StateFormatError, load_tree, save_tree


def test_tree_round_trip_keeps_tuples_int_keys_and_tensors(tmp_path: Path) -> None:
    tree = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
            "fc.weight": {"x": torch.ones(1)},
        },
        "groups": [{"betas": (0.9, 0.95), "params": ["fc.weight"], "lr": 1e-3, "foreach": None}],
        "python": (3, tuple(range(5)), None),
    }
    save_tree(tmp_path, "opt", tree)
    assert not list(tmp_path.glob(".*"))  # no temp files left
    assert not (tmp_path / "opt.safetensors").read_bytes().startswith(b"\x80")  # not a pickle
    back = load_tree(tmp_path, "opt")
    assert back["groups"][0]["betas"] == (0.9, 0.95)
    assert back["python"] == (3, (0, 1, 2, 3, 4), None)
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])  # type: ignore[index]
    assert set(back["state"]) == {0, "fc.weight"}


def test_unstorable_values_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\.a"):
        save_tree(tmp_path, "bad", {"a": object()})
    save_tree(tmp_path, "ok", {"t": torch.zeros(2)})
    (tmp_path / "ok.json").write_text("{not json")
    with pytest.raises(StateFormatError, match=r"ok\.json"):
        load_tree(tmp_path, "ok")
    (tmp_path / "ok.json").write_text(json.dumps({"t": {"__tensor__": "missing"}}))
    with pytest.raises(StateFormatError, match="missing"):
        load_tree(tmp_path, "ok")
    (tmp_path / "ok.safetensors").write_bytes(b"garbage")
    with pytest.raises(StateFormatError, match=r"ok\.safetensors"):
        load_tree(tmp_path, "ok")


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        loss = model(torch.randn(4, 3, generator=g)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_optimizer_state_round_trip_resumes_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    _steps(model, opt, 3, seed=1)
    save_tree(tmp_path, "optimizer", opt.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _steps(model, opt, 3, seed=2)

    model.load_state_dict(weights)
    fresh = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    fresh.load_state_dict(load_tree(tmp_path, "optimizer"))
    assert _steps(model, fresh, 3, seed=2) == expected


def test_rng_state_round_trip(tmp_path: Path) -> None:
    save_tree(tmp_path, "rng", rng_state())
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(5)
    set_rng_state(load_tree(tmp_path, "rng"))
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_schedule_warms_up_then_decays() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    lrs = [lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] < 0.05
    linear = OptimConfig(lr=1.0, schedule="linear")
    assert lr_at(5, 10, linear) == pytest.approx(0.5)
    assert lr_at(7, 10, OptimConfig(lr=0.3, schedule="constant")) == 0.3
