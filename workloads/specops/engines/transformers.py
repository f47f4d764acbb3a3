"""The Transformers engine: runs the verifier's decoder and captures only the requested layers.

Hooks on the decoder layers record what is asked for: slot k is the input of decoder layer k
(Transformers' `hidden_states[k]`), slot `num_layers` the last layer's output before the final norm
(vLLM's `extract_hidden_states` convention). Without logits the lm_head never runs and the forward
stops right after the deepest captured layer. Each sequence is right-padded to the bucket of its own
length (see `engines.batching`), so its bytes do not depend on the batch it shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Self

import torch

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.engines.base import resolve_layer_ids
from specops.engines.batching import plan_batches
from specops.engines.capture import LayerCapture
from specops.example import ExampleDict

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def compute_dtype_name(config: DataGenConfig) -> str:
    """`engine.dtype` wins; when it is auto, `verifier.dtype` decides (auto: bf16 on GPU, fp32 on CPU)."""
    return config.engine.dtype if config.engine.dtype != "auto" else config.verifier.dtype


class TransformersPipeline:
    """InferencePipeline over a Hugging Face causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        layer_ids: list[int] | None = None,
        reduce: Literal["none", "mean"] = "none",
        logits: bool = False,
        output_tokens: bool = False,
        batch_size: int = 8,
        max_tokens_per_batch: int = 16384,
        max_seq_len: int = 2048,
    ) -> None:
        text_config = model.config.get_text_config()
        self.model = model
        self.body: torch.nn.Module = model.get_decoder()
        self.num_layers: int = int(text_config.num_hidden_layers)
        self.hidden_size: int = int(text_config.hidden_size)
        self.layer_ids: list[int] = resolve_layer_ids(layer_ids, self.num_layers)
        if reduce == "mean" and len(self.layer_ids) < 2:
            raise ValueError("states.hidden_states.reduce: 'mean' needs at least two layers (aux + last)")
        self.reduce = reduce
        self.want_logits = logits
        self.want_output_tokens = output_tokens
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_seq_len = max_seq_len
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)

    @classmethod
    def from_config(cls, config: DataGenConfig) -> Self:
        from specops.verifier import load_model, resolve_device, resolve_dtype

        device = resolve_device(config.engine.device)
        dtype = resolve_dtype(compute_dtype_name(config), device)
        torch.manual_seed(config.engine.seed)
        model = load_model(
            config.verifier,
            dtype=dtype,
            device=device,
            allowed_roots=config.run.allowed_roots,
            device_map=config.engine.device_map,
        )
        try:
            return cls(
                model,
                layer_ids=config.states.hidden_states.layers,
                reduce=config.states.hidden_states.reduce,
                logits=config.states.logits,
                output_tokens=config.states.output_tokens,
                batch_size=config.engine.batch_size,
                max_tokens_per_batch=config.engine.max_tokens_per_batch,
                max_seq_len=config.engine.max_seq_len,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def device(self) -> torch.device:
        """Where the input ids go: the input embedding's device (placement hooks move the rest)."""
        weight: torch.Tensor = self.model.get_input_embeddings().weight  # type: ignore[assignment]
        device = weight.device
        return device if device.type != "meta" else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def needs_lm_head(self) -> bool:
        return self.want_logits or self.want_output_tokens

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Sequence[TokenizedExample]) -> list[ExampleDict]:
        """One ExampleDict per input, in input order; examples are regrouped by length bucket."""
        for example in batch:
            if not 1 <= len(example.token_ids) <= self.max_seq_len:
                raise ValueError(
                    f"{example.id}: {len(example.token_ids)} tokens; engine.max_seq_len allows 1..{self.max_seq_len}"
                )
        results: dict[int, ExampleDict] = {}
        plan = plan_batches(
            [len(e.token_ids) for e in batch], self.batch_size, self.max_tokens_per_batch, self.max_positions
        )
        for padded, indices in plan:
            outputs = self._forward_group([batch[i] for i in indices], padded)
            results.update(zip(indices, outputs, strict=True))
        return [results[i] for i in range(len(batch))]

    @torch.inference_mode()
    def _forward_group(self, group: Sequence[TokenizedExample], padded: int) -> list[ExampleDict]:
        """Right-pad every sequence to `padded` and run one forward.

        No attention mask is passed: the model is causal and the padding sits to the right, so no
        real token ever attends to it, and every batch takes the same (causal) attention kernel.
        """
        input_ids = torch.zeros(len(group), padded, dtype=torch.long)
        for row, example in enumerate(group):
            input_ids[row, : len(example.token_ids)] = torch.tensor(example.token_ids, dtype=torch.long)
        input_ids = input_ids.to(self.device)
        logits: torch.Tensor | None = None
        layers: Sequence[torch.nn.Module] = self.body.layers  # type: ignore[assignment]
        with LayerCapture(layers, self.layer_ids, stop_after_deepest=not self.needs_lm_head) as capture:
            if self.needs_lm_head:
                logits = self.model(input_ids=input_ids, use_cache=False).logits
            else:
                self.body(input_ids=input_ids, use_cache=False)
        captured = capture.captured
        return [self._example(row, example, captured, logits) for row, example in enumerate(group)]

    def _example(
        self,
        row: int,
        example: TokenizedExample,
        captured: dict[int, torch.Tensor],
        logits: torch.Tensor | None,
    ) -> ExampleDict:
        n = len(example.token_ids)
        slots = [captured[k][row, :n] for k in self.layer_ids]
        if self.reduce == "mean":
            aux = torch.stack(slots[:-1]).float().mean(0).to(slots[-1].dtype)
            slots = [aux, slots[-1]]
        out: ExampleDict = {
            "id": example.id,
            "token_ids": torch.tensor(example.token_ids, dtype=torch.int32),
            "loss_mask": torch.tensor(example.loss_mask, dtype=torch.uint8),
            "hidden_states": torch.stack(slots, dim=1).cpu(),
        }
        if logits is not None:
            if self.want_logits:
                out["logits"] = logits[row, :n].cpu().clone()
            if self.want_output_tokens:
                out["output_tokens"] = logits[row, :n].argmax(-1).to(device="cpu", dtype=torch.int32)
        return out
