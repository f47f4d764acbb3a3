"""Run by test_models_vllm.py in its own process (vLLM spawns workers, so it needs a __main__).

Trains a small draft for a tiny verifier, saves it, then decodes the same prompts with vLLM
(`method: eagle3`) and with `specops.evaluate`; writes `<root>/result.json` comparing the two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from _models_support import new_draft, verifier_states
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specops.evaluate import evaluate, greedy_decode, speculative_decode
from specops.models.batch import DraftBatch
from specops.models.ttt import step_targets
from specops.models.verifier_head import VerifierHead
from specops.testing.families import family_config


class Case(NamedTuple):
    """One verifier family and draft shape (the command line, in this order)."""

    num_layers: int
    draft_vocab: int
    layer_style: str
    hidden_size: int | None
    architecture: str
    flags: dict[str, Any]
    """Upstream architecture flags for the draft (norm_before_fc, norm_output, layer_types, ...)."""


def build(root: Path, case: Case) -> tuple[LlamaForCausalLM, Path]:
    """A verifier of the case's family vLLM's CPU attention accepts (head_dim 64) and a briefly trained draft."""
    torch.manual_seed(0)
    shape = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 256,
        "eos_token_id": None,
        "pad_token_id": 0,  # Phi-3's default (32000) is outside this vocabulary
        "tie_word_embeddings": False,  # a tied random head is too flat for the draft to learn anything
    }
    config = (
        LlamaConfig(vocab_size=96, **shape)
        if case.architecture == "LlamaForCausalLM"
        else family_config(case.architecture, 96, **shape)
    )
    verifier = AutoModelForCausalLM.from_config(config).eval()
    verifier.generation_config.eos_token_id = None
    verifier.save_pretrained(root / "verifier")
    draft = new_draft(
        verifier,
        root / "verifier",
        num_layers=case.num_layers,
        draft_vocab=case.draft_vocab,
        layer_style=case.layer_style,
        hidden_size=case.hidden_size,
        **case.flags,
    )
    head = VerifierHead.from_pretrained(root / "verifier")
    gen = torch.Generator().manual_seed(0)
    optim = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(24):
        prompt = torch.randint(0, 96, (6,), generator=gen).tolist()
        ids = torch.tensor(prompt + greedy_decode(verifier, prompt, 40, set()))
        aux, last = verifier_states(verifier, ids)
        n = len(ids)
        batch = DraftBatch(
            input_ids=ids[None],
            aux_hidden=aux[None],
            last_hidden=last[None],
            loss_mask=torch.ones(1, n, dtype=torch.bool),
            position_ids=torch.arange(n)[None],
            document_ids=torch.zeros(1, n, dtype=torch.long),
        )
        loss = torch.zeros(())
        for logits, (logp, valid) in zip(
            draft.forward_ttt(batch, 3), step_targets(batch, head, draft.t2d, 3), strict=True
        ):
            kl = (logp.exp() * (logp - torch.log_softmax(logits[valid], -1))).sum(-1)
            loss = loss + kl.mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    draft.eval().save_pretrained(root / "spec")
    return verifier, root / "spec"


def main(root: Path, case: Case) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from specops.models.eagle3 import Eagle3DraftModel

    verifier, spec = build(root, case)
    draft = Eagle3DraftModel.from_pretrained(spec)
    gen = torch.Generator().manual_seed(123)
    prompts = [torch.randint(0, 96, (6,), generator=gen).tolist() for _ in range(6)]
    report = evaluate(verifier, draft, prompts, max_new_tokens=24)
    ours = [speculative_decode(verifier, draft, p, 24, 3, set()).tokens for p in prompts]
    llm = LLM(
        model=str(root / "verifier"),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=128,
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        disable_log_stats=False,
        speculative_config={"model": str(spec), "method": "eagle3", "num_speculative_tokens": 3},
    )
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    metrics = {
        m.name: m.value if hasattr(m, "value") else getattr(m, "values", None) for m in llm.get_metrics()
    }
    (root / "result.json").write_text(
        json.dumps(
            {
                "same_tokens": [list(o.outputs[0].token_ids) == ours[i] for i, o in enumerate(outputs)],
                "vllm_drafts": metrics["vllm:spec_decode_num_drafts"],
                "vllm_accepted": metrics["vllm:spec_decode_num_accepted_tokens"],
                "specops_drafts": report.drafts,
                "specops_accepted": report.accepted_tokens,
                "lossless": report.lossless,
            }
        )
    )


if __name__ == "__main__":
    layers, vocab, style, hidden, architecture, flags = sys.argv[2:8]
    main(
        Path(sys.argv[1]),
        Case(int(layers), int(vocab), style, int(hidden) or None, architecture, json.loads(flags)),
    )
