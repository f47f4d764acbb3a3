"""SpeculatorModel: save/load of speculators-format directories (config.json + model.safetensors).

`SpeculatorModel.from_pretrained(dir)` reads `speculators_model_type` from config.json and builds
the registered model class, so callers never name the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from specops.models.config import WEIGHTS_NAME, SpeculatorFormatError, SpeculatorModelConfig

_MODEL_REGISTRY: dict[str, type[SpeculatorModel]] = {}

M = TypeVar("M", bound="type[SpeculatorModel]")
S = TypeVar("S", bound="SpeculatorModel")


class SpeculatorModel(nn.Module):
    """Base of every draft model; subclasses register under their `speculators_model_type`."""

    config_class: ClassVar[type[SpeculatorModelConfig]] = SpeculatorModelConfig

    def __init__(self, config: SpeculatorModelConfig) -> None:
        super().__init__()
        self.config = config

    @staticmethod
    def register(name: str) -> Callable[[M], M]:
        """Class decorator: `from_pretrained` builds this class for `speculators_model_type == name`."""

        def decorate(cls: M) -> M:
            _MODEL_REGISTRY[name] = cls
            return cls

        return decorate

    @classmethod
    def from_pretrained(
        cls: type[S],
        path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> S:
        """Load a speculator into the class its config.json names (a subclass of `cls`): a local
        directory, or a Hub id (downloaded like a verifier: HF_TOKEN, HF_ENDPOINT, offline cache;
        never from or into `$SPECOPS_MODEL_CACHE`, which holds the verifier only)."""
        from specops.verifier import hub_snapshot, is_local

        where = str(path)
        if is_local(where):
            directory = Path(path)
        else:
            directory = Path(hub_snapshot(where, revision, field="speculator", model_cache=False))
        config = SpeculatorModelConfig.from_pretrained(directory)
        model_cls = _MODEL_REGISTRY.get(config.speculators_model_type)
        if model_cls is None:
            raise SpeculatorFormatError(f"{directory}: no model class for {config.speculators_model_type!r}")
        if not issubclass(model_cls, cls):
            raise SpeculatorFormatError(f"{directory}: holds a {model_cls.__name__}, not a {cls.__name__}")
        model = model_cls(config)
        model.load_weights(directory / WEIGHTS_NAME)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        model.eval()
        return model

    def load_weights(self, file: Path) -> None:
        """Load `file` strictly: every tensor must be present and of the right shape."""
        try:
            state = load_file(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: missing speculator weights") from None
        except SafetensorError as exc:
            raise SpeculatorFormatError(f"{file}: not a readable safetensors file: {exc}") from None
        state = self.complete_loaded(state)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise SpeculatorFormatError(f"{file}: missing tensors {missing}, unexpected tensors {unexpected}")
        wrong = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if state[k].shape != v.shape
        ]
        if wrong:
            raise SpeculatorFormatError(f"{file}: tensor shapes do not match config.json: {wrong}")
        # Keep each tensor's stored dtype class (int64 d2t, bool t2d); float weights follow the module.
        self.load_state_dict(state, strict=True)

    def tensors_for_save(self) -> dict[str, torch.Tensor]:
        """What model.safetensors holds; subclasses leave out tensors the format implies."""
        return self.state_dict()

    def complete_loaded(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add back what `tensors_for_save` left out (inverse hook for loading)."""
        return state

    def save_pretrained(self, path: str | Path) -> None:
        """Write model.safetensors then config.json, each atomically (temp file + rename)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors_for_save().items()}
        tmp = directory / f".{WEIGHTS_NAME}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_NAME)
        self.config.save_pretrained(directory)
