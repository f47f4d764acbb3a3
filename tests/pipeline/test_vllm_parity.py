"""The vLLM engine produces the Transformers engine's data on a real model (SmolLM2-135M, CPU).

A child process (`_vllm_child.py parity`, vLLM needs `__main__`) runs real ShareGPT conversations
through both engines, in one batch and one by one (vLLM also through the file hand-off), and saves
every example. For every example: identical token ids, loss masks and tensor dtypes/shapes; hidden
states equal within `REL_TOL` of each slot's largest magnitude (SmolLM2's residual stream reaches
~2.5e4, so an absolute bound would say nothing); greedy next tokens agree; and within each engine
the bytes do not depend on the batch (or, for vLLM, on the hand-off channel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _vllm_marks import NEEDS_VLLM_AND_SMOLLM2

pytestmark = NEEDS_VLLM_AND_SMOLLM2

CHILD = Path(__file__).with_name("_vllm_child.py")
NUM_EXAMPLES = 8
MAX_LEN = 128
REL_TOL = 1e-5
"""max |vLLM - Transformers| per slot / max |Transformers| of that slot; measured <= 8.4e-7 in fp32."""
RUNS = ("transformers-batch", "transformers-single", "vllm-batch", "vllm-single", "vllm-file")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("vllm-parity")
    proc = subprocess.run(
        [sys.executable, str(CHILD), "parity", str(out), str(NUM_EXAMPLES), str(MAX_LEN)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = {**json.loads((out / "summary.json").read_text()), "out": str(out)}
    return {run: load_file(str(out / f"{run}.safetensors")) for run in RUNS}, summary


def test_every_example_matches_the_transformers_engine(
    results: tuple[dict[str, dict[str, torch.Tensor]], dict],
) -> None:
    runs, summary = results
    reference, vllm = runs["transformers-batch"], runs["vllm-batch"]
    assert len(summary["ids"]) == NUM_EXAMPLES
    assert summary["layer_ids"] == [2, 15, 27, 30]
    for i, example_id in enumerate(summary["ids"]):
        for key in ("token_ids", "loss_mask", "output_tokens"):
            assert vllm[f"{i}.{key}"].dtype == reference[f"{i}.{key}"].dtype, (example_id, key)
        assert torch.equal(vllm[f"{i}.token_ids"], reference[f"{i}.token_ids"]), example_id
        assert torch.equal(vllm[f"{i}.loss_mask"], reference[f"{i}.loss_mask"]), example_id
        assert int(reference[f"{i}.loss_mask"].sum()) > 0, example_id
        ours, theirs = reference[f"{i}.hidden_states"], vllm[f"{i}.hidden_states"]
        assert theirs.shape == ours.shape == (summary["lengths"][i], 4, 576), example_id
        assert theirs.dtype == ours.dtype == torch.float32, example_id
        for slot, layer in enumerate(summary["layer_ids"]):
            scale = ours[:, slot].abs().max()
            error = (theirs[:, slot] - ours[:, slot]).abs().max()
            assert error <= REL_TOL * scale, f"{example_id} layer {layer}: {error:.3g} vs scale {scale:.3g}"
        agree = (vllm[f"{i}.output_tokens"] == reference[f"{i}.output_tokens"]).float().mean()
        assert agree >= 0.99, f"{example_id}: greedy tokens agree on {agree:.3f}"


def test_the_last_slot_is_the_output_before_the_final_norm(
    results: tuple[dict[str, dict[str, torch.Tensor]], dict],
) -> None:
    """Transformers' final norm applied to vLLM's last slot gives Transformers' own last entry."""
    from safetensors.torch import load_file

    runs, summary = results
    norm = load_file(str(summary["out"] + "/norm.safetensors"))
    last = runs["vllm-batch"]["0.hidden_states"][:, -1]
    torch.testing.assert_close(norm["vllm_last_normed"], norm["hf_final"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(last, norm["hf_final"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("batched", "other"), [("transformers-batch", "transformers-single"),
                                                ("vllm-batch", "vllm-single"), ("vllm-batch", "vllm-file")])  # fmt: skip
def test_bytes_do_not_depend_on_batch_size_or_hand_off(
    results: tuple[dict[str, dict[str, torch.Tensor]], dict], batched: str, other: str
) -> None:
    runs, summary = results
    assert runs[batched].keys() == runs[other].keys()
    for name, tensor in runs[batched].items():
        index = int(name.split(".")[0])
        assert tensor.numpy().tobytes() == runs[other][name].numpy().tobytes(), (summary["ids"][index], name)
