"""Helpers for the models tests: a random tiny Llama verifier and DraftBatches built from it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specops.models.batch import PAD_DOCUMENT, DraftBatch
from specops.models.eagle3 import Eagle3DraftModel
from specops.models.vocab import build_vocab_mapping

VOCAB = 96
AUX_LAYERS = (1, 2, 3)


def build_verifier(path: Path, *, tie: bool = False, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """Save a random tiny Llama verifier (safetensors) into `path` and return it in eval mode."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def verifier_states(verifier: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux [T, A, H], last pre-norm [T, H]) of one sequence, slot k = input of decoder layer k."""
    captured: list[torch.Tensor] = []
    hook = verifier.model.norm.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = verifier(ids[None], output_hidden_states=True)
    finally:
        hook.remove()
    aux = torch.stack([out.hidden_states[k][0] for k in AUX_LAYERS], dim=1)
    return aux, captured[0][0]


def packed_batch(
    verifier: LlamaForCausalLM, docs: Sequence[torch.Tensor], row_len: int | None = None
) -> DraftBatch:
    """One row packing `docs` back to back (verifier run per document), padded to `row_len`."""
    parts = [verifier_states(verifier, d) for d in docs]
    total = sum(len(d) for d in docs)
    row = row_len or total
    pad = row - total
    hidden = parts[0][0].shape[-1]
    ids = torch.cat([*docs, torch.zeros(pad, dtype=torch.long)])
    aux = torch.cat([*(p[0] for p in parts), torch.zeros(pad, len(AUX_LAYERS), hidden)])
    last = torch.cat([*(p[1] for p in parts), torch.zeros(pad, hidden)])
    positions = torch.cat([*(torch.arange(len(d)) for d in docs), torch.zeros(pad, dtype=torch.long)])
    document = torch.cat(
        [*(torch.full((len(d),), i) for i, d in enumerate(docs)), torch.full((pad,), PAD_DOCUMENT)]
    )
    mask = document != PAD_DOCUMENT
    return DraftBatch(
        input_ids=ids[None],
        aux_hidden=aux[None],
        last_hidden=last[None],
        loss_mask=mask[None],
        position_ids=positions[None],
        document_ids=document.long()[None],
    )


def stack_rows(rows: Sequence[DraftBatch]) -> DraftBatch:
    """Rows of equal length as one [B, T] batch."""
    return DraftBatch(
        input_ids=torch.cat([r.input_ids for r in rows]),
        aux_hidden=torch.cat([r.aux_hidden for r in rows]),
        last_hidden=torch.cat([r.last_hidden for r in rows]),
        loss_mask=torch.cat([r.loss_mask for r in rows]),
        position_ids=torch.cat([r.position_ids for r in rows]),
        document_ids=torch.cat([r.document_ids for r in rows]),
    )


def new_draft(
    verifier: LlamaForCausalLM,
    verifier_dir: Path,
    *,
    num_layers: int = 1,
    draft_vocab: int = 48,
    seed: int = 1,
    **kwargs: object,
) -> Eagle3DraftModel:
    """A fresh draft whose draft vocab is the `draft_vocab` lowest ids weighted toward small ids."""
    counts = {i: VOCAB - i for i in range(VOCAB)}
    t2d, d2t = build_vocab_mapping(counts, VOCAB, draft_vocab)
    torch.manual_seed(seed)
    return Eagle3DraftModel.from_training_args(
        verifier.config,
        t2d,
        d2t,
        verifier_name_or_path=str(verifier_dir),
        num_layers=num_layers,
        aux_layer_ids=list(AUX_LAYERS),
        **kwargs,  # type: ignore[arg-type]
    )
