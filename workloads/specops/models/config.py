"""Speculators-format configuration: what `config.json` of a saved speculator holds.

The layout is the one vLLM's speculators loader and the reference `speculators` library read:
top-level `speculators_model_type` picks the config subclass (and vLLM's algorithm updater),
`transformer_layer_config` describes the draft's decoder layers, and `speculators_config`
records the algorithm, the proposal methods and the verifier the draft was trained against.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import AutoConfig, PretrainedConfig

if TYPE_CHECKING:
    from collections.abc import Callable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ALGORITHMS = ("eagle3", "hass")
"""Training algorithms recorded in `speculators_config.algorithm`; both save as an eagle3 model."""

SPECULATORS_VERSION = "0.9.0"
"""`speculators_version` written to config.json: the reference `speculators` release whose format
SpecOps writes and is tested against (tests/unit/test_models_reference.py)."""

_BUILTIN_MODULES: dict[str, str] = {"eagle3": "specops.models.eagle3"}
"""speculators_model_type -> module whose import registers its config and model classes."""

_CONFIG_REGISTRY: dict[str, type[SpeculatorModelConfig]] = {}

C = TypeVar("C", bound="type[SpeculatorModelConfig]")


class SpeculatorFormatError(ValueError):
    """A speculator directory or config.json does not follow the speculators format."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenProposalConfig(_Strict):
    """How the draft proposes tokens; SpecOps writes the greedy chain vLLM runs."""

    proposal_type: Literal["greedy"] = "greedy"
    speculative_tokens: int = Field(default=3, ge=1, le=64)
    """Tokens drafted per verification step (vLLM's num_speculative_tokens)."""
    verifier_accept_k: int = Field(default=1, ge=1)
    """A draft token is accepted when it is in the verifier's top-k (1 = exact greedy match)."""
    accept_tolerance: float = Field(default=0.0, ge=0.0)
    """Log-likelihood slack for verifier_accept_k > 1; 0 = strict."""


class SpeculatorVerifierConfig(_Strict):
    """The verifier a speculator was trained for (not `specops.config.VerifierConfig`, the run input)."""

    name_or_path: str | None
    """Hub id or directory vLLM loads as the target when serving the speculator directory alone."""
    architectures: list[str] = Field(default_factory=list)
    """The verifier's `architectures`, used to check a later verifier is compatible."""

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, name_or_path: str | None = None
    ) -> SpeculatorVerifierConfig:
        """Take architectures (and the path, unless given) from a loaded verifier config."""
        path = name_or_path if name_or_path is not None else (config.name_or_path or None)
        return cls(name_or_path=path, architectures=list(config.architectures or []))


class SpeculatorsConfig(_Strict):
    """`speculators_config`: algorithm, proposal methods and verifier."""

    algorithm: Literal["eagle3", "hass"]
    proposal_methods: list[TokenProposalConfig] = Field(min_length=1)
    default_proposal_method: str
    verifier: SpeculatorVerifierConfig

    @model_validator(mode="after")
    def _default_is_listed(self) -> SpeculatorsConfig:
        types = [m.proposal_type for m in self.proposal_methods]
        if self.default_proposal_method not in types:
            raise ValueError(
                f"default_proposal_method {self.default_proposal_method!r} is not one of {types}"
            )
        return self

    @property
    def speculative_tokens(self) -> int:
        """k of the default proposal method."""
        return next(
            m.speculative_tokens
            for m in self.proposal_methods
            if m.proposal_type == self.default_proposal_method
        )

    @classmethod
    def greedy(
        cls, algorithm: Literal["eagle3", "hass"], speculative_tokens: int, verifier: SpeculatorVerifierConfig
    ) -> SpeculatorsConfig:
        """The single greedy-chain proposal SpecOps trains for."""
        return cls(
            algorithm=algorithm,
            proposal_methods=[TokenProposalConfig(speculative_tokens=speculative_tokens)],
            default_proposal_method="greedy",
            verifier=verifier,
        )


class SpeculatorModelConfig(PretrainedConfig):
    """Base of every speculator config; the subclass is chosen by `speculators_model_type`."""

    model_type = "speculator_model"
    speculators_model_type: ClassVar[str] = ""
    speculators_config: SpeculatorsConfig | dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("speculators_model_type", None)
        # The class knows its own type; a file's speculators_version is the writer's (ours is written).
        for key in ("speculators_version", "model_type"):
            kwargs.pop(key, None)
        if isinstance(self.speculators_config, dict):
            self.speculators_config = _validate(
                SpeculatorsConfig, self.speculators_config, "speculators_config"
            )
        super().__post_init__(**kwargs)

    @property
    def spec(self) -> SpeculatorsConfig:
        """`speculators_config`, which every saved speculator must have."""
        if not isinstance(self.speculators_config, SpeculatorsConfig):
            raise SpeculatorFormatError("speculators_config is missing")
        return self.speculators_config

    @classmethod
    def register(cls, name: str) -> Callable[[C], C]:
        """Class decorator: make `name` resolve to this config subclass."""

        def decorate(sub: C) -> C:
            sub.speculators_model_type = name
            _CONFIG_REGISTRY[name] = sub
            return sub

        return decorate

    @staticmethod
    def class_for(speculators_model_type: str) -> type[SpeculatorModelConfig]:
        """The registered config class, importing SpecOps' built-in model modules on demand."""
        if speculators_model_type not in _CONFIG_REGISTRY and speculators_model_type in _BUILTIN_MODULES:
            importlib.import_module(_BUILTIN_MODULES[speculators_model_type])
        try:
            return _CONFIG_REGISTRY[speculators_model_type]
        except KeyError:
            known = sorted({*_CONFIG_REGISTRY, *_BUILTIN_MODULES})
            raise SpeculatorFormatError(
                f"speculators_model_type {speculators_model_type!r} is not supported (known: {known})"
            ) from None

    @classmethod
    def from_speculators_dict(
        cls, data: dict[str, Any], source: str = "config.json"
    ) -> SpeculatorModelConfig:
        """Parse a speculators config dict into the subclass its `speculators_model_type` names."""
        kind = data.get("speculators_model_type")
        if not isinstance(kind, str) or not kind:
            raise SpeculatorFormatError(
                f"{source}: speculators_model_type is missing; not a speculators-format model"
            )
        if "speculators_config" not in data:
            raise SpeculatorFormatError(f"{source}: speculators_config is missing")
        sub = cls.class_for(kind)
        if not issubclass(sub, cls):
            raise SpeculatorFormatError(f"{source}: {kind!r} is a {sub.__name__}, not a {cls.__name__}")
        try:
            return sub(**{k: v for k, v in data.items() if k != "speculators_model_type"})
        except (ValidationError, TypeError, ValueError) as exc:
            raise SpeculatorFormatError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> SpeculatorModelConfig:  # type: ignore[override]
        """Read `<path>/config.json` (local directories only: speculators are trained or converted here)."""
        file = Path(path) / CONFIG_NAME
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file}: no speculator config (expected a speculator directory)"
            ) from None
        except json.JSONDecodeError as exc:
            raise SpeculatorFormatError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpeculatorFormatError(f"{file}: top level must be an object")
        return cls.from_speculators_dict(data, str(file))

    def speculators_dict(self) -> dict[str, Any]:
        """The exact `config.json` content: the speculators fields, nothing transformers-internal."""
        return {
            "architectures": list(self.architectures or []),
            "speculators_model_type": self.speculators_model_type,
            "speculators_version": SPECULATORS_VERSION,
            "speculators_config": self.spec.model_dump(mode="json"),
        }

    def to_dict(self) -> dict[str, Any]:
        return self.speculators_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.speculators_dict()

    def save_pretrained(
        self, save_directory: str | os.PathLike[Any], push_to_hub: bool = False, **_: Any
    ) -> None:
        """Write config.json atomically (temp file + rename)."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported; upload the directory yourself")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.speculators_dict(), indent=2, sort_keys=True) + "\n"
        tmp = directory / f".{CONFIG_NAME}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / CONFIG_NAME)


def layer_config_from_dict(data: dict[str, Any] | PretrainedConfig, field: str) -> PretrainedConfig:
    """`transformer_layer_config` as a transformers config of its `model_type` (llama by default)."""
    if isinstance(data, PretrainedConfig):
        return data
    if not isinstance(data, dict):
        raise SpeculatorFormatError(f"{field} must be an object, got {type(data).__name__}")
    values = dict(data)
    model_type = values.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:
        raise SpeculatorFormatError(f"{field}: {exc}") from None


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any, field: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{field}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            if e["loc"]
            else f"{field}: {e['msg']}"
            for e in exc.errors()
        )
        raise SpeculatorFormatError(problems) from None
