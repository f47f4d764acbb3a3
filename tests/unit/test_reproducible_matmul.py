"""Importing specops makes CPU matmuls row-reproducible: a row's bytes do not depend on the batch.

Without MKL's strict reproducibility mode, a [M, 1536] x [1536, 576] product on two threads splits
its reduction differently for M = 128 and M = 1024, and a sequence's hidden states change with the
batch it is generated in. Each case runs in a fresh interpreter: MKL reads the mode at its first call.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROW_CHECK = """
import specops, torch
torch.set_num_threads(2)
torch.manual_seed(0)
w = torch.randn(576, 1536)
x = torch.randn(8, 128, 1536)
whole = torch.nn.functional.linear(x, w)
alone = torch.cat([torch.nn.functional.linear(x[i : i + 1], w) for i in range(8)])
print(torch.equal(whole, alone))
"""


def run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | env
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_rows_do_not_depend_on_the_batch() -> None:
    assert run(ROW_CHECK) == "True"


def test_the_mode_is_set_on_import_and_a_user_choice_wins() -> None:
    code = "import os, specops; print(os.environ['MKL_CBWR'])"
    assert run(code) == "AUTO,STRICT"
    assert run(code, MKL_CBWR="AVX2") == "AVX2"
