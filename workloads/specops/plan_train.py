"""`specops plan` for a training: what the trainer reads, its optimizer steps, the draft's size and
the disk its checkpoints take, before any GPU starts.

Every figure says where it comes from. A DiskStore is counted from its manifests alone (example ids
and each shard's token count; no tensor is read); a training fed by a data generation in the same
file takes that generation's plan (counted or estimated, as it says); a stream reads at most
maxSteps x tokensPerStep per rank. The draft is the trainer's own, built on PyTorch's meta device
(shapes, no weights) from the verifier's config.json where it is local or already in the Hub
cache, else from the table of known verifiers (`plan.KNOWN_LAYERS`): nothing is downloaded, and
otherwise the parameters are said to be unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specops import plan
from specops.config import ConfigError, TrainConfig
from specops.plan_inputs import PlannedTraining
from specops.stores.base import StoreMeta

STEPS_ESTIMATE = (
    "estimated: full batches of the train tokens per rank (rows x rowLen tokens each), x epochs; "
    "first-fit packing leaves gaps, so the trainer's own count is usually a little higher"
)


@dataclass(frozen=True)
class DataFigures:
    """What the trainer will read, and where each figure comes from."""

    examples: int | None
    tokens: int | None
    source: str
    held_out_examples: int | None = None
    held_out_tokens: int | None = None
    held_out_source: str = ""
    meta: StoreMeta | None = None
    capture_layers: list[int] | None = None
    """The layers a feeding generation captures (the last is the verifier's output)."""


def plan_training(training: PlannedTraining, feed: dict[str, Any] | None) -> dict[str, Any]:
    """The plan of one training as plain data (what `--json` prints); `feed` is the plan of the
    data generation that feeds it, when the file holds one."""
    cfg = training.config
    figures = data_figures(cfg, training.ranks, feed)
    out: dict[str, Any] = {
        "training": training.label,
        "verifier": cfg.verifier.name_or_path,
        "ranks": training.ranks,
        "data": {
            "kind": cfg.data.kind,
            "examples": figures.examples,
            "tokens": figures.tokens,
            "source": figures.source,
        },
    }
    fraction = cfg.data.validation_fraction
    if figures.examples is not None and figures.tokens is not None:
        held_examples = figures.held_out_examples
        held_tokens = figures.held_out_tokens
        out["held_out"] = {
            "fraction": fraction,
            "examples": held_examples,
            "tokens": held_tokens,
            "source": figures.held_out_source,
        }
        out["train"] = {
            "examples": figures.examples - (held_examples or 0),
            "tokens": figures.tokens - (held_tokens or 0),
        }
    out["steps"] = _steps(cfg, training.ranks, out.get("train"))
    draft = draft_parameters(cfg, figures)
    if isinstance(draft, str):
        out["draft"] = {"unknown": draft}
    else:
        out["draft"] = {"parameters": draft.parameters, "trainable": draft.trainable, "source": draft.source}
        size = plan.checkpoint_size(
            draft.saved,
            draft.trainable_tensors,
            ranks=training.ranks,
            keep=cfg.keep_checkpoints,
            validation=fraction > 0,
        )
        out["checkpoint"] = {
            "model_bytes": size.model_bytes,
            "optimizer_bytes": size.optimizer_bytes,
            "bytes": size.checkpoint_bytes,
            "keep": size.keep,
            "published": size.published,
            "published_bytes": size.published_bytes,
            "peak_bytes": size.peak_bytes,
        }
    out["storage_bytes"] = training.storage_bytes
    out["time"] = None  # the project has measured no training throughput it could scale from
    return out


# --------------------------------------------------------------------------- the data


def data_figures(cfg: TrainConfig, ranks: int, feed: dict[str, Any] | None) -> DataFigures:
    """Examples and tokens the trainer will read: a stream's bound, the feeding plan's, or the store's."""
    layers = feed["capture"]["layers"] if feed and "capture" in feed else None
    if cfg.data.kind in ("mpqueue", "zmq"):
        if cfg.max_steps is None:  # the config refuses this; kept for the type checker
            return DataFigures(None, None, "a stream without maxSteps", capture_layers=layers)
        return DataFigures(
            None,
            cfg.max_steps * cfg.tokens_per_step * ranks,
            "at most maxSteps x tokensPerStep x ranks (a stream; examples are not known ahead)",
            capture_layers=layers,
        )
    if feed is not None:
        if "examples" not in feed:
            return DataFigures(
                None, None, f"unknown: {feed.get('unknown', 'see its plan')}", capture_layers=layers
            )
        source = f"the plan of {feed['run']} above: {feed['tokens_source']}"
        return _with_share(cfg, feed["examples"], feed["tokens"], source, layers)
    if cfg.data.kind == "speculators":
        return DataFigures(None, None, "unknown: upstream hs_*.safetensors files are not counted")
    assert cfg.data.path is not None  # the config requires it for disk data
    return _store_figures(cfg)


def _with_share(
    cfg: TrainConfig, examples: int, tokens: int, source: str, layers: list[int] | None
) -> DataFigures:
    """A planned generation's figures with the held-out share estimated from the fraction."""
    fraction = cfg.data.validation_fraction
    held = round(examples * fraction)
    return DataFigures(
        examples,
        tokens,
        source,
        held,
        round(tokens * fraction),
        f"estimated: validationFraction {fraction} of the conversations, by hash (seed {cfg.seed})",
        capture_layers=layers,
    )


def _store_figures(cfg: TrainConfig) -> DataFigures:
    """A DiskStore counted from its manifests; held-out examples by the trainer's own split."""
    from specops.data.split import HeldOutSplit
    from specops.stores.disk import DiskStore

    assert cfg.data.path is not None
    try:
        store = DiskStore.open(cfg.data.path, cfg.allowed_roots, verify="size", field="data.path")
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    split = HeldOutSplit(cfg.data.validation_fraction, cfg.seed)
    examples, tokens = len(store), store.listed_tokens()
    held = sum(1 for part in store.partitions() for ex_id in store.ids(part) if split.held_out(ex_id))
    return DataFigures(
        examples,
        tokens,
        "counted: the store's manifests (example ids and shard token counts; no tensor read)",
        held,
        round(tokens * held / examples) if examples else 0,
        f"examples counted by the trainer's split (by conversation, validationFraction "
        f"{cfg.data.validation_fraction}, seed {cfg.seed}); tokens estimated pro rata",
        meta=store.meta,
    )


def _steps(cfg: TrainConfig, ranks: int, train: dict[str, int] | None) -> dict[str, Any]:
    if cfg.max_steps is not None:
        return {"count": cfg.max_steps, "source": "maxSteps (the trainer runs exactly that many)"}
    if train is None:
        return {"count": None, "source": "unknown: the data's size is unknown and maxSteps is unset"}
    count = plan.optimizer_steps(
        train["tokens"],
        train["examples"],
        tokens_per_step=cfg.tokens_per_step,
        max_seq_len=cfg.max_seq_len,
        batching=cfg.batching,
        epochs=cfg.epochs,
        ranks=ranks,
    )
    source = (
        STEPS_ESTIMATE if cfg.batching == "packed" else "estimated: train examples / ranks / rows x epochs"
    )
    return {"count": count, "source": source}


# --------------------------------------------------------------------------- the draft


@dataclass(frozen=True)
class DraftSize:
    parameters: int
    trainable: int
    saved: list[tuple[int, int]]
    """(elements, bytes per element) of each tensor model.safetensors holds."""
    trainable_tensors: list[int]
    source: str


def draft_parameters(cfg: TrainConfig, figures: DataFigures) -> DraftSize | str:
    """The trainer's draft built on the meta device, or why it cannot be (no download is tried)."""
    import torch

    from specops.models.eagle3 import Eagle3DraftModel
    from specops.train.trainer import check_draft, data_aux_layers, draft_options

    found = _verifier_config(cfg)
    if isinstance(found, str):
        return found
    verifier_config, where = found
    check_draft(cfg.draft, verifier_config)
    if figures.capture_layers is not None:
        aux: list[int] | None = list(figures.capture_layers[:-1])
    else:
        try:
            aux = (
                data_aux_layers(figures.meta, verifier_config, cfg.verifier.name_or_path)
                if figures.meta
                else None
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    config = Eagle3DraftModel.training_config(
        verifier_config,
        cfg.draft.draft_vocab_size,
        verifier_name_or_path=cfg.verifier.name_or_path,
        aux_layer_ids=aux,
        **draft_options(cfg.draft),
    )
    with torch.device("meta"):
        draft = Eagle3DraftModel(config)
    params = list(draft.parameters())
    trainable = [p.numel() for p in params if p.requires_grad]
    saved = [(t.numel(), t.element_size()) for t in draft.tensors_for_save().values()]
    return DraftSize(
        sum(p.numel() for p in params),
        sum(trainable),
        saved,
        trainable,
        f"the trainer's draft on the meta device, from {where}",
    )


def _verifier_config(cfg: TrainConfig) -> tuple[Any, str] | str:
    """(the verifier's config, where it was read): a local directory, the Hub cache, or the table
    of known verifiers; never a download."""
    from transformers import AutoConfig

    from specops.paths import resolve_allowed
    from specops.verifier import is_local

    verifier = cfg.verifier
    name = verifier.name_or_path
    if is_local(name):
        path = resolve_allowed(name, cfg.allowed_roots, "verifier.nameOrPath")
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path), str(path / "config.json")
        missing = f"{path}/config.json is not here"
    else:
        try:
            found = AutoConfig.from_pretrained(
                name,
                revision=verifier.revision,
                trust_remote_code=verifier.trust_remote_code,
                local_files_only=True,
            )
        except (OSError, ValueError):
            missing = f"the config.json of {name!r} is not in the local Hub cache"
        else:
            return found, f"{name}'s config.json in the Hub cache"
    known = _known_config(cfg)
    if known is not None:
        return known
    return (
        f"{missing}, it is not a known verifier, and plan downloads nothing "
        f"(`specops fetch-verifier` fills the cache)"
    )


def _known_config(cfg: TrainConfig) -> tuple[Any, str] | None:
    """A config with the dimensions of a verifier in plan's tables (what the draft's shapes need)."""
    from transformers import AutoConfig

    shape = plan.known_shape(cfg.verifier)
    if shape is None or shape.source not in plan.KNOWN_LAYERS:
        return None
    model_type, intermediate, heads, kv_heads, head_dim = plan.KNOWN_LAYERS[shape.source]
    architecture = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    config = AutoConfig.for_model(
        model_type,
        architectures=[architecture[model_type]],
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )
    return config, f"the table of known verifiers ({shape.source}; no config.json at hand)"
