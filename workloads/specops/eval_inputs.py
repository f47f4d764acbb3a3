"""What `specops evaluate` starts from with either engine: the speculator, its verifier and the prompts.

Its own module so that the command and the vLLM path (`specops.evaluate_vllm`) both import it and
neither imports the other.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specops import exitcodes
from specops.data.split import HeldOutSplit

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from specops.config import VerifierConfig
    from specops.models.eagle3 import Eagle3DraftModel


@dataclass
class EvalInputs:
    """What evaluation starts from with either engine, resolved and checked from the arguments."""

    speculator_dir: Path
    device: torch.device
    dtype: torch.dtype
    draft: Eagle3DraftModel
    verifier: VerifierConfig
    prompts: list[list[int]]
    source: dict[str, Any]
    """Where the prompts came from (`specops.evaluate.PromptSet.source`)."""
    model: PreTrainedModel


def load_inputs(args: argparse.Namespace) -> EvalInputs:
    """Speculator, verifier (the one the speculator records unless --verifier) and prompts.

    Raises ValueError/KeyError/SpeculatorFormatError with a message naming the argument at fault.
    """
    from specops.config import VerifierConfig
    from specops.evaluate import load_prompts
    from specops.models.eagle3 import Eagle3DraftModel
    from specops.paths import resolve_allowed
    from specops.verifier import (
        hub_snapshot,
        is_local,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    roots = args.allowed_root
    speculator_dir = (
        resolve_allowed(args.speculator, roots, "--speculator")
        if is_local(args.speculator)
        else Path(hub_snapshot(args.speculator, None, field="--speculator"))
    )
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    draft = Eagle3DraftModel.from_pretrained(speculator_dir, device=device)
    verifier_name = args.verifier or draft.config.spec.verifier.name_or_path
    if not verifier_name:
        raise ValueError("--verifier: the speculator records no verifier; pass one")
    verifier = VerifierConfig(name_or_path=verifier_name, gguf_file=args.gguf_file)
    data, split, field = args.data, None, "--data"
    if args.train_config is not None:
        data, split = held_out_of(args.train_config)
        field = "--train-config data.path"
    found = load_prompts(
        data,
        get_tokenizer=lambda: load_tokenizer(verifier, roots),
        allowed_roots=roots,
        limit=args.max_prompts,
        field=field,
        split=split,
    )
    if not found.prompts:
        held = " held-out" if split is not None else ""
        raise exitcodes.DataError(f"{field}: {data} holds no{held} prompts")
    model = load_model(verifier, dtype=dtype, device=device, allowed_roots=roots)
    return EvalInputs(speculator_dir, device, dtype, draft, verifier, found.prompts, found.source, model)


def held_out_of(train_config: Path) -> tuple[str, HeldOutSplit]:
    """The data a training read and the split that kept its held-out conversations out of it."""
    from specops.config import ConfigError, TrainConfig, load_config

    cfg = load_config(TrainConfig, train_config)
    if cfg.data.kind != "disk" or not cfg.data.path:
        raise ConfigError(
            f"--train-config: {train_config}: data.kind is {cfg.data.kind!r}; held-out prompts need a DiskStore"
        )
    if cfg.data.validation_fraction <= 0:
        raise ConfigError(
            f"--train-config: {train_config}: data.validationFraction is 0, so the training held out no "
            "conversation to evaluate on"
        )
    return cfg.data.path, HeldOutSplit(cfg.data.validation_fraction, cfg.seed)
