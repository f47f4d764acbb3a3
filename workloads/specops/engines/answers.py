"""Greedy answers from the verifier, for `regenerate`: Transformers `generate` or a plain vLLM `LLM`.

Both return, per prompt, the new token ids: cut after the first end-of-sequence id when the model
stopped by itself (that id included), else exactly `max_new_tokens` long. Decoding is greedy,
because drafts are evaluated (and mostly served) against the verifier's greedy continuation.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self

import torch

from specops.config import ConfigError, DataGenConfig
from specops.engines.batching import in_length_groups

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class AnswerEngine(Protocol):
    """What `regenerate` needs from an engine."""

    eos: set[int]

    def answer(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]: ...

    def close(self) -> None: ...


def cut_at_eos(tokens: Sequence[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """Tokens up to and including the first EOS, at most `max_new_tokens`."""
    out: list[int] = []
    for token in tokens[:max_new_tokens]:
        out.append(int(token))
        if token in eos:
            break
    return out


def load_answer_engine(config: DataGenConfig) -> AnswerEngine:
    """The answering engine of `engine.kind` (weights load here: seconds to minutes)."""
    if config.engine.kind == "transformers":
        return TransformersAnswers.from_config(config)
    return VllmAnswers.from_config(config)


class TransformersAnswers:
    """Left-padded batches through `model.generate`, prompts grouped by length."""

    def __init__(self, model: PreTrainedModel, eos: set[int], batch_size: int) -> None:
        self.model = model
        self.eos = eos
        self.batch_size = batch_size
        self.pad_id = min(eos)  # masked out; any id the embedding has

    @classmethod
    def from_config(cls, config: DataGenConfig) -> Self:
        from specops.engines.transformers import compute_dtype_name
        from specops.verifier import load_model, resolve_device, resolve_dtype

        device = resolve_device(config.engine.device)
        dtype = resolve_dtype(compute_dtype_name(config), device)
        model = load_model(
            config.verifier, dtype=dtype, device=device, allowed_roots=config.run.allowed_roots
        )
        assert config.regenerate is not None
        return cls(model, verifier_eos(config), config.regenerate.batch_size)

    def answer(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return in_length_groups(prompts, self.batch_size, lambda group: self._group(group, max_new_tokens))

    @torch.inference_mode()
    def _group(self, prompts: list[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        device = self.model.device
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(  # type: ignore[operator]  # transformers types generate loosely
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=settings
        )
        return [cut_at_eos(row, self.eos, max_new_tokens) for row in out[:, width:].tolist()]

    def close(self) -> None:
        del self.model
        gc.collect()


class VllmAnswers:
    """A plain vLLM engine (no hidden-state capture) answering token prompts greedily."""

    def __init__(self, llm: Any, eos: set[int]) -> None:
        self.llm = llm
        self.eos = eos

    @classmethod
    def from_config(cls, config: DataGenConfig) -> Self:
        from specops.engines.vllm import EnginePlan, require_vllm

        require_vllm()
        from vllm import LLM

        plan = EnginePlan.from_config(config)
        plan.pin_devices()
        eos = verifier_eos(config)
        llm = LLM(**plan.answer_kwargs())
        return cls(llm, eos)

    def answer(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(self.eos), detokenize=False
        )
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [cut_at_eos(list(o.outputs[0].token_ids), self.eos, max_new_tokens) for o in outputs]

    def close(self) -> None:
        engine = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        del self.llm
        gc.collect()


def verifier_eos(config: DataGenConfig) -> set[int]:
    """EOS ids from the verifier's generation config, else its model config."""
    from transformers import GenerationConfig

    from specops.evaluate import id_set
    from specops.verifier import load_verifier_config, resolve_verifier

    path = resolve_verifier(config.verifier, config.run.allowed_roots)
    try:
        value = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        value = None
    if value is None:
        value = getattr(load_verifier_config(config.verifier, config.run.allowed_roots), "eos_token_id", None)
    ids = id_set(value)
    if not ids:
        raise ConfigError("regenerate: the verifier defines no eos_token_id; answers would never end")
    return ids
