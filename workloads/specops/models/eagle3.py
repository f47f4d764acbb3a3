"""EAGLE-3 draft model (also trained as HASS): config, decoder layers, TTT forward, proposals.

Architecture (tensor names are what vLLM's `Eagle3LlamaForCausalLM` loader expects):
`fc` fuses the A=3 auxiliary verifier hidden states (A*H -> H), optionally after one RMSNorm over
their concatenation (`input_norm`, `norm_before_fc`) or one per state (`fc_norm.i`, `fc_norm`); `layers.0` takes
`[input_layernorm(embed(token)); hidden_norm(hidden)]` (2H) into attention and keeps `hidden`
(or its norm, `norm_before_residual`) as the residual; further `layers.i` are plain pre-norm
decoder layers, each attending over all earlier positions or, for a `sliding_attention` entry of
`layer_types`, the last `sliding_window` ones; `norm` + `lm_head` give logits over the draft vocabulary
(with `norm_output` the normed state is also what the next TTT step reads); `d2t` maps a draft id
to its target id (`target = draft + d2t[draft]`), `t2d` marks target ids in the draft vocab.
`embed_tokens` and `lm_head` are copies of the verifier's (lm_head rows selected by t2d) and frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, Qwen3Config
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from specops.engines.base import default_layer_ids
from specops.models.base import SpeculatorModel
from specops.models.batch import DraftBatch
from specops.models.config import (
    SpeculatorFormatError,
    SpeculatorModelConfig,
    SpeculatorsConfig,
    SpeculatorVerifierConfig,
    layer_config_from_dict,
)
from specops.models.safetensors_io import read_tensors, weight_locations
from specops.models.ttt import context_mask, rows_needed, step_tokens
from specops.models.verifier_head import verifier_tensor_names
from specops.models.vocab import check_vocab_mapping

ARCHITECTURE = "Eagle3DraftModel"
LayerStyle = Literal["llama", "qwen3"]
LayerType = Literal["full_attention", "sliding_attention"]
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")
"""`transformer_layer_config.layer_types` entries the draft implements (others are refused)."""
_LAYER_CONFIGS: dict[str, Any] = {"llama": LlamaConfig, "qwen3": Qwen3Config}
_NOISE_KEYS = (
    "architectures",
    "chunk_size_feed_forward",
    "dtype",
    "id2label",
    "is_encoder_decoder",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "transformers_version",
    "_name_or_path",
)
"""transformers-internal keys left out of `transformer_layer_config` (they describe no layer)."""
_ATTENTION_BUDGET = 1 << 26
"""Max attention scores (batch x heads x queries x keys) per chunk: bounds memory on long packed rows."""


@SpeculatorModelConfig.register("eagle3")
class Eagle3SpeculatorConfig(SpeculatorModelConfig):
    """config.json of an EAGLE-3 (or HASS-trained) draft."""

    transformer_layer_config: PretrainedConfig | dict[str, Any] | None = None
    draft_vocab_size: int = 32000
    norm_before_residual: bool = False
    target_hidden_size: int | None = None
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    norm_before_fc: bool = False
    """One RMSNorm (`input_norm`, A*H wide) over the concatenated auxiliary states before `fc`."""
    fc_norm: bool = False
    """One RMSNorm per auxiliary state (`fc_norm.i`) before concatenation; excludes norm_before_fc."""
    norm_output: bool = False
    """The last layer's output goes through `norm` before lm_head AND before the next TTT step reads it."""
    embed_requires_grad: bool = False
    """Training: the embedding is trained too (it is frozen by default, a copy of the verifier's)."""

    def __post_init__(self, **kwargs: Any) -> None:
        if self.transformer_layer_config is None:
            raise SpeculatorFormatError("transformer_layer_config is missing")
        self.transformer_layer_config = layer_config_from_dict(
            self.transformer_layer_config, "transformer_layer_config"
        )
        if not self.architectures:
            self.architectures = [ARCHITECTURE]
        vocab = int(self.layer_config.vocab_size)
        if not 1 <= int(self.draft_vocab_size) <= vocab:
            raise SpeculatorFormatError(f"draft_vocab_size {self.draft_vocab_size} must be in 1..{vocab}")
        style = self.layer_config.model_type
        if style not in _LAYER_CONFIGS:
            raise SpeculatorFormatError(
                f"transformer_layer_config.model_type {style!r} is not implemented (known: {sorted(_LAYER_CONFIGS)})"
            )
        if self.norm_before_fc and self.fc_norm:
            raise SpeculatorFormatError("norm_before_fc and fc_norm exclude each other: set one")
        self.sliding_layers()  # refuses layer types the draft does not implement
        super().__post_init__(**kwargs)

    def sliding_layers(self) -> dict[int, int]:
        """Layer index -> attention window (in positions) of the `sliding_attention` layers.

        A query at position t sees keys t - window + 1 .. t (upstream's rule, also vLLM's)."""
        cfg = self.layer_config
        types = list(getattr(cfg, "layer_types", None) or [])
        layers = int(cfg.num_hidden_layers)
        field = "transformer_layer_config.layer_types"
        if not types:
            return {}
        unknown = sorted({t for t in types if t not in LAYER_TYPES})
        if unknown:
            raise SpeculatorFormatError(f"{field}: {unknown} not implemented (known: {list(LAYER_TYPES)})")
        if len(types) != layers:
            raise SpeculatorFormatError(f"{field} has {len(types)} entries for {layers} layers")
        window = getattr(cfg, "sliding_window", None)
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if sliding and (not isinstance(window, int) or window < 1):
            raise SpeculatorFormatError(
                f"transformer_layer_config.sliding_window must be a positive integer for the "
                f"sliding_attention layers {sliding}, got {window!r}"
            )
        return dict.fromkeys(sliding, int(window or 0))

    @property
    def layer_config(self) -> PretrainedConfig:
        """`transformer_layer_config` as a transformers config."""
        cfg = self.transformer_layer_config
        if not isinstance(cfg, PretrainedConfig):
            raise SpeculatorFormatError("transformer_layer_config is missing")
        return cfg

    @property
    def num_aux_layers(self) -> int:
        """Auxiliary verifier layers fused by `fc` (3 unless the ids say otherwise)."""
        ids = self.eagle_aux_hidden_state_layer_ids
        return len(ids) if ids else 3

    def speculators_dict(self) -> dict[str, Any]:
        layer = {k: v for k, v in self.layer_config.to_dict().items() if k not in _NOISE_KEYS}
        return {
            **super().speculators_dict(),
            "transformer_layer_config": layer,
            "draft_vocab_size": int(self.draft_vocab_size),
            "norm_before_residual": bool(self.norm_before_residual),
            "target_hidden_size": self.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": self.eagle_aux_hidden_state_layer_ids,
            "norm_before_fc": bool(self.norm_before_fc),
            "fc_norm": bool(self.fc_norm),
            "norm_output": bool(self.norm_output),
            "embed_requires_grad": bool(self.embed_requires_grad),
        }


def draft_layer_config(
    verifier_config: PretrainedConfig,
    num_layers: int,
    layer_style: LayerStyle,
    hidden_size: int | None = None,
    layer_types: Sequence[LayerType] | None = None,
    sliding_window: int | None = None,
) -> PretrainedConfig:
    """Decoder-layer config of the draft: the verifier's dimensions and rotary setup, `num_layers` deep.

    With a `hidden_size` of its own the draft keeps the verifier's heads and head size, and its MLP
    width scales with the hidden size. `layer_types` (one per layer) and `sliding_window` are
    recorded as transformers and upstream write them; unset = every layer attends over everything."""
    text = verifier_config.get_text_config()
    target = int(text.hidden_size)
    hidden = int(hidden_size or target)
    heads = int(text.num_attention_heads)
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]  # per layer type (Gemma 3): the draft attends over everything
    return _LAYER_CONFIGS[layer_style](
        vocab_size=int(text.vocab_size),
        hidden_size=hidden,
        intermediate_size=max(1, round(int(text.intermediate_size) * hidden / target)),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or target // heads),
        hidden_act=str(getattr(text, "hidden_act", "silu")),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 4096)),
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        **_attention_kinds(layer_style, num_layers, layer_types, sliding_window),
    )


def _attention_kinds(
    layer_style: LayerStyle, num_layers: int, layer_types: Sequence[LayerType] | None, window: int | None
) -> dict[str, Any]:
    """The layer config keys for per-layer attention kinds (none when every layer is full)."""
    if not layer_types:
        if window is not None:
            raise ValueError("sliding_window needs layer_types naming its sliding_attention layers")
        return {}
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    sliding = "sliding_attention" in layer_types
    if sliding != (window is not None):
        raise ValueError("sliding_window is needed exactly when layer_types has a sliding_attention layer")
    kinds: dict[str, Any] = {"layer_types": list(layer_types), "sliding_window": window}
    if layer_style == "qwen3":  # Qwen3Config drops sliding_window unless this is set
        kinds["use_sliding_window"] = sliding
    return kinds


@dataclass
class StepKV:
    """One layer's keys/values across TTT steps.

    `context` holds step 0 for every position (built from verifier features); `diagonal[j]` holds
    step j+1 for the current query positions only (the draft's own features). New keys go to the
    context while `extending` (step 0, also incrementally across inference steps), else to the diagonal.
    """

    context: tuple[torch.Tensor, torch.Tensor] | None = None
    diagonal: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    extending: bool = True

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys/values of the current queries."""
        if not self.extending:
            self.diagonal.append((k, v))
        elif self.context is None:
            self.context = (k, v)
        else:
            self.context = (torch.cat([self.context[0], k], dim=2), torch.cat([self.context[1], v], dim=2))


@dataclass
class DraftContext:
    """The draft's step-0 keys/values of an accepted prefix, kept across inference steps.

    Positions with verifier features are always accepted tokens, so this never needs a rollback;
    each `propose` call adds the positions that gained verifier features since the last one.
    """

    layers: list[StepKV]
    length: int = 0


def ttt_attention(
    q: torch.Tensor,
    kv: StepKV,
    context_allowed: torch.Tensor,
    scale: float,
    aligned: bool,
) -> torch.Tensor:
    """Attention of queries [B, h, Tq, d] over context keys (masked) plus diagonal keys (same index).

    `context_allowed` is bool [B, Tq, Tk]. `aligned` = query row r is context position r (training),
    which lets each query chunk skip the context keys after it.
    """
    if kv.context is None:
        raise RuntimeError("ttt_attention called before the step-0 context was stored")
    ctx_k, ctx_v = kv.context
    b, heads, tq, _ = q.shape
    tk = ctx_k.shape[2]
    n_diag = len(kv.diagonal)
    gqa = heads != ctx_k.shape[1]
    chunk = tq
    while chunk > 16 and b * heads * chunk * (tk + n_diag * chunk) > _ATTENTION_BUDGET:
        chunk //= 2
    outs = []
    for r0 in range(0, tq, chunk):
        r1 = min(tq, r0 + chunk)
        end = r1 if aligned else tk
        keys = [ctx_k[:, :, :end], *(k[:, :, r0:r1] for k, _ in kv.diagonal)]
        values = [ctx_v[:, :, :end], *(v[:, :, r0:r1] for _, v in kv.diagonal)]
        allowed = context_allowed[:, r0:r1, :end]
        if n_diag:
            eye = torch.eye(r1 - r0, dtype=torch.bool, device=q.device).expand(b, -1, -1)
            allowed = torch.cat([allowed, *([eye] * n_diag)], dim=-1)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, r0:r1],
                torch.cat(keys, dim=2),
                torch.cat(values, dim=2),
                attn_mask=allowed[:, None],
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2)


class DraftAttention(nn.Module):
    """Multi-head attention (GQA) whose keys span TTT steps; Qwen3 style adds per-head q/k RMSNorm."""

    def __init__(self, cfg: PretrainedConfig, in_features: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.head_dim)
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = nn.Linear(in_features, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, int(cfg.hidden_size), bias=bias)
        self.q_norm: nn.Module | None = LlamaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm: nn.Module | None = LlamaRMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: StepKV,
        context_allowed: torch.Tensor,
        aligned: bool,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` is [B, T, F], or [N, F] for the positions `rows` (bool [B, T]) marks; the output
        has the same layout. Rows are attended in place (zeros elsewhere, never read back)."""
        b, t = x.shape[:2] if rows is None else rows.shape

        def project(linear: nn.Linear, heads: int) -> torch.Tensor:
            out = linear(x)
            if rows is not None:
                out = out.new_zeros(b, t, out.shape[-1]).index_put((rows,), out)
            return out.view(b, t, heads, self.head_dim)

        q = project(self.q_proj, self.heads)
        k = project(self.k_proj, self.kv_heads)
        v = project(self.v_proj, self.kv_heads).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
        kv.add(k, v)
        out = ttt_attention(q, kv, context_allowed, 1.0 / math.sqrt(self.head_dim), aligned)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out if rows is None else out[rows])


class DraftDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the first one reads `[embed; hidden]` (2H) as EAGLE-3 defines."""

    def __init__(
        self, cfg: PretrainedConfig, *, first: bool, norm_before_residual: bool, qk_norm: bool
    ) -> None:
        super().__init__()
        hidden = int(cfg.hidden_size)
        self.first = first
        self.norm_before_residual = norm_before_residual
        self.self_attn = DraftAttention(cfg, 2 * hidden if first else hidden, qk_norm)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(hidden, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, cfg.rms_norm_eps)
        self.hidden_norm: nn.Module | None = LlamaRMSNorm(hidden, cfg.rms_norm_eps) if first else None

    def forward(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: StepKV,
        context_allowed: torch.Tensor,
        aligned: bool,
        rows: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden` (and `embeds`) are [B, T, H], or [N, H] at the positions `rows` marks; with
        `keep` (bool [B, T], full input only) just those positions go on past attention."""
        if self.hidden_norm is not None:
            if embeds is None:
                raise ValueError("the first draft layer needs token embeddings")
            normed = self.hidden_norm(hidden)
            residual = normed if self.norm_before_residual else hidden
            x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        else:
            residual, x = hidden, self.input_layernorm(hidden)
        hidden = residual + self.self_attn(x, rope, kv, context_allowed, aligned, rows)
        if keep is not None:
            hidden = hidden[keep]
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def _copy_into(param: torch.Tensor, source: torch.Tensor, what: str) -> None:
    """Copy a verifier tensor into a draft parameter; a 2H-input projection takes it on its hidden half."""
    if param.shape == source.shape:
        param.copy_(source)
    elif param.dim() == 2 and param.shape[0] == source.shape[0] and param.shape[1] == 2 * source.shape[1]:
        param[:, source.shape[1] :].copy_(source)
    else:
        raise ValueError(f"{what}: shape {tuple(source.shape)} does not fit {tuple(param.shape)}")


@SpeculatorModel.register("eagle3")
class Eagle3DraftModel(SpeculatorModel):
    """The EAGLE-3 draft; `forward_ttt` trains it, `propose` drafts tokens at inference."""

    config_class: ClassVar[type[SpeculatorModelConfig]] = Eagle3SpeculatorConfig
    config: Eagle3SpeculatorConfig
    d2t: torch.Tensor
    t2d: torch.Tensor

    def __init__(self, config: SpeculatorModelConfig) -> None:
        if not isinstance(config, Eagle3SpeculatorConfig):
            raise TypeError(f"Eagle3DraftModel needs an Eagle3SpeculatorConfig, got {type(config).__name__}")
        super().__init__(config)
        cfg = config.layer_config
        hidden, vocab, draft_vocab = int(cfg.hidden_size), int(cfg.vocab_size), int(config.draft_vocab_size)
        target_hidden = int(config.target_hidden_size or hidden)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        aux = config.num_aux_layers
        self.input_norm: nn.Module | None = (
            LlamaRMSNorm(aux * target_hidden, cfg.rms_norm_eps) if config.norm_before_fc else None
        )
        self.fc_norm: nn.ModuleList | None = (
            nn.ModuleList(LlamaRMSNorm(target_hidden, cfg.rms_norm_eps) for _ in range(aux))
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(aux * target_hidden, hidden, bias=False)
        self.windows = config.sliding_layers()
        """Layer index -> attention window of the sliding_attention layers (the others see everything)."""
        qk_norm = cfg.model_type == "qwen3"
        self.layers = nn.ModuleList(
            DraftDecoderLayer(
                cfg, first=i == 0, norm_before_residual=config.norm_before_residual, qk_norm=qk_norm
            )
            for i in range(int(cfg.num_hidden_layers))
        )
        self.norm = LlamaRMSNorm(hidden, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(cast(LlamaConfig, cfg))  # Qwen3Config has the same rope fields
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool))
        self._init_weights(float(getattr(cfg, "initializer_range", 0.02)))
        self.own_vocab_layers = target_hidden != hidden
        """A draft narrower or wider than its verifier trains its own embedding and lm_head."""
        if not self.own_vocab_layers:
            self.embed_tokens.requires_grad_(bool(config.embed_requires_grad))
            self.lm_head.requires_grad_(False)

    def _init_weights(self, std: float) -> None:
        """Small normal init; residual-branch outputs scaled by 1/sqrt(2 * layers) so depth stays stable."""
        out_std = std / math.sqrt(2 * len(self.layers))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_training_args(
        cls,
        verifier_config: PretrainedConfig,
        t2d: torch.Tensor,
        d2t: torch.Tensor,
        *,
        verifier_name_or_path: str,
        verifier_weights: str | Path | None = None,
        draft_vocab_size: int | None = None,
        **options: Any,
    ) -> Eagle3DraftModel:
        """A fresh draft for a verifier: verifier embeddings, lm_head rows (by t2d) and final norm
        copied; with `init_from_verifier`, its layers and `fc` start from the verifier's too
        (`init_from_verifier_layers`). A `hidden_size` other than the verifier's records
        `target_hidden_size` and starts the embedding, norm and lm_head fresh (trained).

        `verifier_name_or_path` is recorded for vLLM; weights are read from `verifier_weights`
        (default: the same path). `options` are `training_config`'s keywords, named as in
        `specops.config.DraftConfig`.
        """
        check_vocab_mapping(t2d, d2t)
        text = verifier_config.get_text_config()
        if draft_vocab_size is not None and draft_vocab_size != d2t.numel():
            raise ValueError(f"draft_vocab_size {draft_vocab_size} != len(d2t) {d2t.numel()}")
        if t2d.numel() != int(text.vocab_size):
            raise ValueError(f"t2d has {t2d.numel()} entries but the verifier vocab is {text.vocab_size}")
        config = cls.training_config(
            verifier_config, d2t.numel(), verifier_name_or_path=verifier_name_or_path, **options
        )
        model = cls(config)
        model.set_vocab_mapping(t2d, d2t)
        weights = verifier_weights if verifier_weights is not None else verifier_name_or_path
        if config.target_hidden_size is None:
            model.copy_verifier_weights(weights)
        if options.get("init_from_verifier"):
            model.init_from_verifier_layers(weights, int(text.num_hidden_layers))
        return model

    @classmethod
    def training_config(
        cls,
        verifier_config: PretrainedConfig,
        draft_vocab_size: int,
        *,
        verifier_name_or_path: str,
        algorithm: Literal["eagle3", "hass"] = "eagle3",
        num_layers: int = 1,
        layer_style: LayerStyle = "llama",
        norm_before_residual: bool = False,
        speculative_tokens: int = 3,
        aux_layer_ids: Sequence[int] | None = None,
        init_from_verifier: bool = False,
        hidden_size: int | None = None,
        norm_before_fc: bool = False,
        fc_norm: bool = False,
        norm_output: bool = False,
        layer_types: Sequence[LayerType] | None = None,
        sliding_window: int | None = None,
    ) -> Eagle3SpeculatorConfig:
        """The config `from_training_args` builds its draft from, without reading any weight
        (`specops plan` instantiates it on the meta device to count parameters)."""
        text = verifier_config.get_text_config()
        layer_ids = (
            list(aux_layer_ids) if aux_layer_ids else default_layer_ids(int(text.num_hidden_layers))[:3]
        )
        target_hidden = int(text.hidden_size)
        own_width = hidden_size is not None and hidden_size != target_hidden
        if own_width and init_from_verifier:
            raise ValueError(
                f"init_from_verifier copies the verifier's layers, which need its hidden size {target_hidden}, "
                f"not {hidden_size}"
            )
        return Eagle3SpeculatorConfig(
            architectures=[ARCHITECTURE],
            transformer_layer_config=draft_layer_config(
                verifier_config, num_layers, layer_style, hidden_size, layer_types, sliding_window
            ),
            draft_vocab_size=draft_vocab_size,
            norm_before_residual=norm_before_residual,
            norm_before_fc=norm_before_fc,
            fc_norm=fc_norm,
            norm_output=norm_output,
            target_hidden_size=target_hidden if own_width else None,
            eagle_aux_hidden_state_layer_ids=layer_ids,
            speculators_config=SpeculatorsConfig.greedy(
                algorithm,
                speculative_tokens,
                SpeculatorVerifierConfig.from_config(verifier_config, verifier_name_or_path),
            ),
        )

    def set_vocab_mapping(self, t2d: torch.Tensor, d2t: torch.Tensor) -> None:
        """Install the draft<->target vocabulary mapping (see `specops.models.vocab`)."""
        if tuple(t2d.shape) != tuple(self.t2d.shape) or tuple(d2t.shape) != tuple(self.d2t.shape):
            raise ValueError(
                f"vocab mapping shapes t2d {tuple(t2d.shape)}, d2t {tuple(d2t.shape)} do not match the model "
                f"({tuple(self.t2d.shape)}, {tuple(self.d2t.shape)})"
            )
        self.t2d.copy_(t2d.to(torch.bool))
        self.d2t.copy_(d2t.to(torch.long))

    def copy_verifier_weights(self, verifier: str | Path) -> None:
        """Copy the verifier's input embedding, final norm and lm_head rows (selected by t2d)."""
        names = verifier_tensor_names(verifier)
        embed, norm, head = names.embed, names.norm, names.lm_head
        tensors = read_tensors(verifier, sorted({embed, norm, head}))
        if tuple(tensors[embed].shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"{verifier}: embedding {tuple(tensors[embed].shape)} does not match the draft "
                f"{tuple(self.embed_tokens.weight.shape)}"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(tensors[embed])
            self.norm.weight.copy_(tensors[norm])
            self.lm_head.weight.copy_(tensors[head][self.t2d.to(tensors[head].device)])

    def init_from_verifier_layers(self, verifier: str | Path, verifier_layers: int) -> None:
        """Warm start: draft layer i starts as verifier layer `verifier_layers - n + i`, and `fc`
        passes the deepest auxiliary hidden state through, so training starts from the verifier's
        own last computation instead of noise. The first layer's attention reads the verifier
        layer's projections on the hidden half of its `[embed; hidden]` input (the embedding half
        keeps its random init); its `hidden_norm` starts as the verifier layer's input norm."""
        hidden, layers = int(self.fc.weight.shape[0]), len(self.layers)
        aux = self.config.num_aux_layers
        if self.fc.weight.shape[1] != aux * hidden:
            raise ValueError(f"init_from_verifier needs the verifier's hidden size ({hidden}) for fc")
        if verifier_layers < layers:
            raise ValueError(
                f"init_from_verifier: the verifier has {verifier_layers} layers, the draft {layers}"
            )
        names = verifier_tensor_names(verifier)
        present = set(weight_locations(verifier))
        optional = ("self_attn.q_norm.", "self_attn.k_norm.")  # only where both sides are Qwen3-style
        copies: list[tuple[str, nn.Parameter, str]] = []
        for index, layer in enumerate(self.layers):
            prefix = names.layer(verifier_layers - layers + index)
            for own, param in layer.named_parameters():
                name = prefix + own.replace("hidden_norm.", "input_layernorm.")
                if name in present or not own.startswith(optional):
                    copies.append((f"layers.{index}.{own}", param, name))
        tensors = read_tensors(verifier, [name for _, _, name in copies])
        with torch.no_grad():
            for own, param, name in copies:
                _copy_into(param, tensors[name], f"{own} <- {name}")
            ids = self.config.eagle_aux_hidden_state_layer_ids
            deepest = max(range(aux), key=ids.__getitem__) if ids else aux - 1
            self.fc.weight.zero_()
            self.fc.weight[:, deepest * hidden : (deepest + 1) * hidden].copy_(torch.eye(hidden))

    @property
    def full_vocab(self) -> bool:
        """The draft predicts over the whole verifier vocabulary (d2t/t2d are the identity)."""
        return self.d2t.numel() == self.t2d.numel()

    def tensors_for_save(self) -> dict[str, torch.Tensor]:
        """Full-vocabulary drafts save no d2t/t2d: vLLM has no slot for them then and refuses the file."""
        state = super().tensors_for_save()
        if self.full_vocab:
            state = {k: v for k, v in state.items() if k not in ("d2t", "t2d")}
        return state

    def complete_loaded(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Identity d2t/t2d for full-vocabulary drafts saved without them."""
        if self.full_vocab and "d2t" not in state and "t2d" not in state:
            return {**state, "d2t": torch.zeros_like(self.d2t), "t2d": torch.ones_like(self.t2d)}
        return state

    # ------------------------------------------------------------------ forward passes

    def _step(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: list[StepKV],
        masks: Sequence[torch.Tensor],
        aligned: bool,
        rows: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One draft pass over all layers; returns what the next step reads (see `step_output`).

        `positions` is always [B, T]; `hidden` and `tokens` are [B, T, ..] or, with `rows`, just the
        marked positions. `masks` holds each layer's context mask (`layer_masks`). `keep` makes the
        last layer return only its marked positions."""
        embeds = self.embed_tokens(tokens).to(hidden.dtype)
        rope: tuple[torch.Tensor, torch.Tensor] = self.rotary_emb(hidden, positions)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            hidden = layer(
                hidden,
                embeds if index == 0 else None,
                rope,
                caches[index],
                masks[index],
                aligned,
                rows=rows,
                keep=keep if index == last else None,
            )
        return self.norm(hidden) if self.config.norm_output else hidden

    def layer_masks(self, allowed: torch.Tensor, queries: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's context mask: `allowed` (bool [B, Tq, Tk]), narrowed for a sliding layer to
        keys within its window of the query's context index (`queries`, [Tq])."""
        keys = torch.arange(allowed.shape[-1], device=allowed.device)
        windowed = {
            w: allowed & (keys[None, :] > queries[:, None] - w)[None] for w in set(self.windows.values())
        }
        return [windowed[self.windows[i]] if i in self.windows else allowed for i in range(len(self.layers))]

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """fc over the concatenated auxiliary hidden states [.., A, H] -> [.., H], after
        `input_norm` (over all of them) or `fc_norm` (each its own) where the config asks."""
        features = aux_hidden.to(self.fc.weight.dtype)
        if self.fc_norm is not None:
            features = torch.stack([norm(features[..., i, :]) for i, norm in enumerate(self.fc_norm)], -2)
        features = features.flatten(-2)
        if self.input_norm is not None:
            features = self.input_norm(features)
        return self.fc(features)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of what `_step` returned (normed already with norm_output)."""
        return self.lm_head(hidden if self.config.norm_output else self.norm(hidden))

    def forward_ttt(
        self, batch: DraftBatch, ttt_steps: int, where: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Draft logits [B, T, Vd] per TTT step, aligned with `ttt.step_targets` (see ttt.py).

        Step 0 reads fused verifier features; step i > 0 reads the draft's own hidden output of
        step i-1 and attends to step-0 context keys plus its own keys of steps 1..i at the same index.
        With `where` (bool [B, T] per step), step i returns only the rows `where[i]` marks, [N_i, Vd],
        and computes no more than `ttt.rows_needed` asks: past step 0's keys and values, positions
        no step trains on (prompts, padding) cost nothing.
        """
        if where is not None and len(where) != ttt_steps:
            raise ValueError(f"where has {len(where)} masks for {ttt_steps} TTT steps")
        if ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
        if batch.aux_hidden.shape[2] != self.config.num_aux_layers:
            raise ValueError(
                f"DraftBatch.aux_hidden has {batch.aux_hidden.shape[2]} aux layers, the draft fuses "
                f"{self.config.num_aux_layers}"
            )
        allowed = context_mask(batch.document_ids)
        masks = self.layer_masks(allowed, torch.arange(allowed.shape[1], device=allowed.device))
        caches = [StepKV() for _ in self.layers]
        hidden = self.fuse(batch.aux_hidden)
        needed = rows_needed(where) if where is not None else None
        out = []
        for step in range(ttt_steps):
            tokens = step_tokens(batch.input_ids, step)
            positions = batch.position_ids + step
            if where is None or needed is None:
                hidden = self._step(hidden, tokens, positions, caches, masks, aligned=True)
                out.append(self.logits(hidden))
            else:
                rows = needed[step]
                if step == 0:
                    hidden = self._step(hidden, tokens, positions, caches, masks, aligned=True, keep=rows)
                else:  # hidden holds step-1's rows, a superset of this step's
                    hidden = hidden[rows[needed[step - 1]]]
                    hidden = self._step(
                        hidden, tokens[rows], positions, caches, masks, aligned=True, rows=rows
                    )
                out.append(self.logits(hidden[where[step][rows]]))
            for cache in caches:
                cache.extending = False
        return out

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> verifier ids."""
        return draft_ids + self.d2t[draft_ids]

    def new_context(self) -> DraftContext:
        """An empty inference context for one sequence (see `propose`)."""
        return DraftContext([StepKV() for _ in self.layers])

    @torch.no_grad()
    def propose(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        num_tokens: int,
        context: DraftContext | None = None,
    ) -> torch.Tensor:
        """Greedy chain of `num_tokens` verifier-vocabulary ids continuing one unpacked sequence.

        `input_ids` [B, n+1] are the tokens so far (the last one produced by the verifier and not
        yet run through it); `aux_hidden` [B, n, A, H] the verifier's aux states for the first n.
        With a `context` from earlier calls on the same (growing) sequence, only positions added
        since then are run through the draft's step 0.

        A sliding layer's window moves with each drafted position, as in vLLM's KV cache (training
        keeps it at the last accepted position, as upstream does); it must span the drafted tokens.
        """
        short = {i: w for i, w in self.windows.items() if w < num_tokens - 1}
        if short:
            raise ValueError(
                f"sliding_window {min(short.values())} of draft layers {sorted(short)} cannot see the "
                f"{num_tokens - 1} positions drafted before the last of {num_tokens}"
            )
        b, n_plus_1 = input_ids.shape
        n = n_plus_1 - 1
        ctx = context if context is not None else self.new_context()
        if n < 1 or aux_hidden.shape[:2] != (b, n) or not ctx.length < n:
            raise ValueError(
                f"propose needs input_ids [B, n+1] and aux_hidden [B, n, A, H] with n > {ctx.length} "
                f"(positions already in the context); got {tuple(input_ids.shape)} and {tuple(aux_hidden.shape)}"
            )
        device = input_ids.device
        start = ctx.length
        new_positions = torch.arange(start, n, device=device)
        allowed = (torch.arange(n, device=device)[None, :] <= new_positions[:, None]).expand(b, -1, -1)
        masks = self.layer_masks(allowed, new_positions)
        hidden = self._step(
            self.fuse(aux_hidden[:, start:]),
            input_ids[:, start + 1 :],
            new_positions.expand(b, -1),
            ctx.layers,
            masks,
            aligned=False,
        )
        ctx.length = n
        hidden = hidden[:, -1:]
        chain = [StepKV(context=layer.context, extending=False) for layer in ctx.layers]
        last_allowed = allowed[:, -1:]
        proposed = []
        for step in range(num_tokens):
            token = self.to_target_ids(self.logits(hidden).argmax(-1))
            proposed.append(token)
            if step + 1 < num_tokens:
                position = n - 1 + step + 1
                masks = self.layer_masks(last_allowed, torch.tensor([position], device=device))
                positions = torch.full((b, 1), position, device=device)
                hidden = self._step(hidden, token, positions, chain, masks, aligned=False)
        return torch.cat(proposed, dim=1)
