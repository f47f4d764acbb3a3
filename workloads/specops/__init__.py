"""SpecOps workloads: data generation, streaming, speculator training and evaluation.

Importing this package stays light (no torch); heavy modules import torch themselves.
"""

__version__ = "0.1.0"
