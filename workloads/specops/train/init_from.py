"""`draft.initFrom`: start a run from an existing speculator's weights instead of fresh ones.

The run builds its draft from its own config as always (so what it saves describes this run:
algorithm, k, verifier reference), then takes every tensor of the loaded speculator, d2t/t2d
included, after checking that both describe the same model. A difference is a ConfigError naming
`draft.initFrom` and the field, never a reshape: a tensor of another shape would need inventing
weights, and a draft for another verifier or other auxiliary layers reads other features. Every
rank loads the same files (DDP/FSDP then start from identical weights). A Hub id is downloaded
into the ordinary Hub cache, never looked up in `$SPECOPS_MODEL_CACHE` (it holds the verifier only).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from specops.config import ConfigError
from specops.engines.base import default_layer_ids
from specops.models.config import SpeculatorFormatError
from specops.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from specops.paths import resolve_allowed
from specops.verifier import HUB_ID_PATTERN, hub_snapshot, is_local

log = logging.getLogger(__name__)

FIELD = "draft.initFrom"

Getter = Callable[[Eagle3SpeculatorConfig], Any]


def _layer(name: str) -> Getter:
    return lambda c: getattr(c.layer_config, name, None)


def _flag(name: str) -> Getter:
    return lambda c: bool(getattr(c, name, False))


def _sliding_layers(c: Eagle3SpeculatorConfig) -> list[int]:
    kinds = getattr(c.layer_config, "layer_types", None) or []
    return [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]


SAME: tuple[tuple[str, Getter], ...] = (
    ("draft.layerStyle (transformer_layer_config.model_type)", lambda c: c.layer_config.model_type),
    ("draft.numLayers (transformer_layer_config.num_hidden_layers)", _layer("num_hidden_layers")),
    ("draft.hiddenSize (transformer_layer_config.hidden_size)", _layer("hidden_size")),
    ("draft.draftVocabSize (draft_vocab_size)", lambda c: int(c.draft_vocab_size)),
    ("draft.normBeforeResidual (norm_before_residual)", _flag("norm_before_residual")),
    ("the verifier vocabulary (transformer_layer_config.vocab_size)", _layer("vocab_size")),
    (
        "the verifier hidden size (target_hidden_size)",
        lambda c: c.target_hidden_size or c.layer_config.hidden_size,
    ),
    ("transformer_layer_config.intermediate_size", _layer("intermediate_size")),
    ("transformer_layer_config.num_attention_heads", _layer("num_attention_heads")),
    ("transformer_layer_config.num_key_value_heads", _layer("num_key_value_heads")),
    ("transformer_layer_config.head_dim", _layer("head_dim")),
    ("draft.layerTypes (transformer_layer_config.layer_types)", _sliding_layers),
    ("draft.slidingWindow (transformer_layer_config.sliding_window)", _layer("sliding_window")),
    ("draft.normBeforeFc (norm_before_fc)", _flag("norm_before_fc")),
    ("draft.fcNorm (fc_norm)", _flag("fc_norm")),
    ("draft.normOutput (norm_output)", _flag("norm_output")),
)
"""What must be equal in the loaded speculator and this run's draft, each named for the message."""


def locate(init_from: str, revision: str | None, allowed_roots: Sequence[str]) -> Path:
    """The speculator directory: a local one under an allowed root, or a Hub id's snapshot at
    `revision` (None: the default branch)."""
    if is_local(init_from):
        if revision is not None:
            raise ConfigError(
                f"draft.initFromRevision: {init_from} is a local directory, which has no revisions; "
                "unset initFromRevision or give a Hub id"
            )
        path = resolve_allowed(init_from, allowed_roots, FIELD)
        if not path.is_dir():
            raise FileNotFoundError(f"{FIELD}: {path} is not a speculator directory")
        return path
    if not re.match(HUB_ID_PATTERN, init_from):
        raise ConfigError(f"{FIELD}: {init_from!r} is neither an existing local path nor a Hub id")
    return Path(hub_snapshot(init_from, revision, FIELD, model_cache=False))


def differences(
    loaded: Eagle3SpeculatorConfig, wanted: Eagle3SpeculatorConfig, verifier_layers: int
) -> list[str]:
    """Each way `loaded` is not the model `wanted` describes, as `<field> is A in the speculator, B in this run`."""
    found = []
    for label, value in SAME:
        theirs, ours = value(loaded), value(wanted)
        if theirs != ours:
            found.append(f"{label} is {theirs!r} in the speculator, {ours!r} in this run")
    default_aux = default_layer_ids(verifier_layers)[:3]
    theirs_aux = list(loaded.eagle_aux_hidden_state_layer_ids or default_aux)
    ours_aux = list(wanted.eagle_aux_hidden_state_layer_ids or default_aux)
    if theirs_aux != ours_aux:
        found.append(
            f"the auxiliary layers (eagle_aux_hidden_state_layer_ids) are {theirs_aux} in the speculator, "
            f"{ours_aux} in this run's data"
        )
    found += _verifier_differences(loaded, wanted)
    return found


def _verifier_differences(loaded: Eagle3SpeculatorConfig, wanted: Eagle3SpeculatorConfig) -> list[str]:
    """The verifier the speculator was trained for (`speculators_config.verifier`) is this run's."""
    theirs, ours = loaded.spec.verifier, wanted.spec.verifier
    found = []
    if theirs.name_or_path is None:
        log.warning("%s: the speculator records no verifier; only its shapes are checked", FIELD)
    elif not _same_model(theirs.name_or_path, ours.name_or_path):
        found.append(
            f"the verifier (speculators_config.verifier.name_or_path) is {theirs.name_or_path!r} in the "
            f"speculator, {ours.name_or_path!r} in this run"
        )
    if theirs.architectures and ours.architectures and theirs.architectures != ours.architectures:
        found.append(
            f"the verifier architectures (speculators_config.verifier.architectures) are "
            f"{theirs.architectures} in the speculator, {ours.architectures} in this run"
        )
    return found


def _same_model(a: str, b: str | None) -> bool:
    """The same Hub id, or two spellings of one local directory."""
    if a == b:
        return True
    if b is None or not (is_local(a) and is_local(b)):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def start_from(
    draft: Eagle3DraftModel,
    init_from: str,
    revision: str | None,
    allowed_roots: Sequence[str],
    verifier_layers: int,
) -> Path:
    """Load `init_from` (at Hub `revision`) into `draft` (same architecture checked first); returns
    the directory read."""
    directory = locate(init_from, revision, allowed_roots)
    try:
        loaded = Eagle3DraftModel.from_pretrained(directory)
    except SpeculatorFormatError as exc:
        raise ConfigError(f"{FIELD}: {init_from}: {exc}") from None
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{FIELD}: {exc}") from None
    assert isinstance(loaded.config, Eagle3SpeculatorConfig) and isinstance(
        draft.config, Eagle3SpeculatorConfig
    )
    problems = differences(loaded.config, draft.config, verifier_layers)
    if problems:
        raise ConfigError(f"{FIELD}: {init_from} does not fit this run: " + "; ".join(problems))
    with torch.no_grad():
        draft.load_state_dict(loaded.state_dict(), strict=True)
    return directory
