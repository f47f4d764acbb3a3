"""SpecOps workloads: data generation, streaming, speculator training and evaluation.

Importing this package stays light (no torch); heavy modules import torch themselves.
"""

import os

# Intel MKL (torch's CPU BLAS) splits some matmul reductions across threads depending on the row
# count, so a sequence's hidden states would change with the batch it shares. Strict conditional
# reproducibility keeps every row's bytes independent of the batch (~4% slower GEMMs on CPU). MKL
# reads this at its first call, hence here, before any torch work; a value set by the user wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
