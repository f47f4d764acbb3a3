"""Acceptance of a speculator against its verifier: chain speculative decoding, greedy, k tokens.

Each verification step the draft proposes k tokens from the verifier's aux hidden states of the
accepted prefix; the verifier scores `[last token, d1..dk]` in one cached forward, accepts the
longest prefix matching its own greedy choices and adds its next token. Acceptance length is
`1 + accepted / drafts` (vLLM's definition); per-position acceptance is the share of steps whose
first j+1 draft tokens were all accepted. Greedy verification is lossless by construction: the
output must equal the verifier's own greedy decoding token for token, and that is checked. In
fp32 the check is exact; in bf16/fp16 a batched verification forward and a one-token decoding
step round differently and can flip a near-tie argmax, so there the share of prompts whose output
differs (`mismatch_rate`) is compared against a tolerance (`max_mismatch_rate`) instead.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specops.data.split import HeldOutSplit, conversation_id
from specops.engines.batching import in_length_groups
from specops.engines.capture import LayerCapture
from specops.paths import resolve_allowed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from specops.models.eagle3 import Eagle3DraftModel

log = logging.getLogger(__name__)

REDUCED_PRECISION_MISMATCH_RATE = 0.5
"""Default `max_mismatch_rate` in bf16/fp16: at most this share of prompts may leave the verifier's
own greedy decoding (docs/models.md "Evaluate"). Measured in bf16 on CPU: 2 of 6 SmolLM2 prompts
(32 tokens) with a fine draft, 0 of 40 on the tiny test verifier; a broken verification (a cache
or acceptance bug) diverges on nearly every prompt. fp32 stays exact (0)."""


def default_max_mismatch_rate(dtype: torch.dtype) -> float:
    """Exact in fp32 (and fp64); `REDUCED_PRECISION_MISMATCH_RATE` in bf16/fp16."""
    return REDUCED_PRECISION_MISMATCH_RATE if dtype in (torch.bfloat16, torch.float16) else 0.0


@dataclass
class SpeculativeOutput:
    """Tokens generated for one prompt and the accepted draft count of every verification step."""

    tokens: list[int]
    accepted: list[int]


PROGRESS_EVERY = 5.0
"""Seconds between evaluation progress lines (a line also marks the last prompt done)."""


class DecodeProgress:
    """Log lines while prompts decode, so a long evaluation is not silent: `what: prompt i/N done,
    T/B tokens (t tokens/s, r prompts/s)` (B: the token budget, `max_new_tokens` per prompt), at
    most every `every` seconds and when the last prompt ends."""

    def __init__(self, what: str, total: int, max_new_tokens: int, every: float | None = None) -> None:
        self.what, self.total, self.budget = what, total, total * max_new_tokens
        self.every = PROGRESS_EVERY if every is None else every
        self.finished = self.tokens = 0
        self.began = self._last = time.perf_counter()

    def add(self, tokens: int, finished: int) -> None:
        """`tokens` more generated, `finished` more prompts done."""
        self.tokens += tokens
        self.finished += finished
        now = time.perf_counter()
        last = finished > 0 and self.finished >= self.total
        if not last and now - self._last < self.every:
            return
        self._last = now
        seconds = max(now - self.began, 1e-9)
        log.info(
            "%s: prompt %d/%d done, %d/%d tokens (%.1f tokens/s, %.2f prompts/s)",
            self.what,
            self.finished,
            self.total,
            self.tokens,
            self.budget,
            self.tokens / seconds,
            self.finished / seconds,
        )


@dataclass
class EvalReport:
    """Aggregate acceptance over all prompts (the JSON `specops evaluate` prints)."""

    prompts: int
    speculative_tokens: int
    drafts: int
    accepted_tokens: int
    acceptance_length: float
    per_position: list[float]
    accepted_per_position: list[int]
    """Steps whose first j+1 draft tokens were all accepted (`per_position` = these / `drafts`)."""
    generated_tokens: int
    lossless: bool
    """Every prompt's output equals the verifier's greedy decoding, token for token."""
    mismatched_prompts: list[int] = field(default_factory=list)
    first_mismatch: list[int] = field(default_factory=list)
    """Per mismatched prompt, the first generated token that differs (late = a rounding flip after
    a long agreeing run, position 0 on most prompts = a broken verification)."""
    mismatch_rate: float = 0.0
    """Share of prompts whose output differs from the verifier's greedy decoding."""
    max_mismatch_rate: float = 0.0
    """The tolerance the verdict used (0 = exact; see `default_max_mismatch_rate`)."""
    seconds: float = 0.0
    source: dict[str, Any] | None = None
    """Where the prompts came from (`PromptSet.source`)."""

    @property
    def passed(self) -> bool:
        """The lossless verdict: mismatches within the tolerance (none in fp32)."""
        return self.mismatch_rate <= self.max_mismatch_rate

    def mismatch_message(self) -> str:
        """What the lossless verdict found, in one line."""
        return (
            f"speculative output differs from greedy decoding for {self.mismatch_rate:.0%} of the "
            f"prompts (allowed: {self.max_mismatch_rate:.0%}; prompts {self.mismatched_prompts})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class CachedVerifier:
    """The verifier over a batch of sequences with one KV cache; returns aux states of new positions.

    Rows advance together, one chunk of new tokens per row per forward (memory-bound on CPU, so a
    batch costs about what one row does). Shorter chunks are padded on the right; padding and
    rejected draft tokens stay in the cache as masked slots instead of being cropped per row, and
    position ids count only kept tokens, so every row attends to exactly its own sequence.

    Sliding windows count cache slots, so a masked slot would shift them: a verifier with windowed
    layers (Gemma, gpt-oss, Mistral v0.1) runs one row at a time in a full cache that is cut back
    on rejection.
    """

    def __init__(self, model: PreTrainedModel, aux_layer_ids: Sequence[int], rows: int = 1) -> None:
        from transformers import DynamicCache

        self.model = model
        self.layers: Sequence[torch.nn.Module] = model.get_decoder().layers
        self.aux_layer_ids = list(aux_layer_ids)
        self.windowed = has_sliding_window(model)
        if self.windowed and rows != 1:
            raise ValueError("a verifier with sliding-window layers is decoded one row at a time")
        self.cache = DynamicCache() if self.windowed else DynamicCache(config=model.config)
        self.device = next(model.parameters()).device
        self.kept = torch.zeros(rows, 0, dtype=torch.bool, device=self.device)
        """[rows, slots]: which cache slots hold a kept token of that row."""

    @property
    def lengths(self) -> list[int]:
        """Kept tokens per row (the next position id)."""
        return [int(n) for n in self.kept.sum(dim=1).tolist()]

    @torch.inference_mode()
    def extend(
        self, chunks: Sequence[Sequence[int]], last_logits_only: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run each row's `chunks[r]` after its kept tokens (an empty chunk leaves the row as it is).

        Returns per row (logits [n or 1, V], aux [n, A, H]) of its n new positions.
        """
        if len(chunks) != self.kept.shape[0]:
            raise ValueError(f"extend: {len(chunks)} chunks for {self.kept.shape[0]} rows")
        width = max(len(c) for c in chunks)
        if width == 0:
            raise ValueError("extend: every chunk is empty")
        sizes = [len(c) for c in chunks]
        if self.kept.shape[1] == 0 and len(chunks) > 1 and min(sizes) > 0:
            return self._prefill_rows(chunks, last_logits_only)
        ids = torch.tensor([[*c, *[0] * (width - len(c))] for c in chunks], device=self.device)
        offsets = torch.arange(width, device=self.device)
        new_kept = offsets[None, :] < torch.tensor(sizes, device=self.device)[:, None]
        positions = torch.tensor(self.lengths, device=self.device)[:, None] + offsets[None, :]
        self.kept = torch.cat([self.kept, new_kept], dim=1)
        last = sorted({max(n - 1, 0) for n in sizes})
        keep = torch.tensor(last, device=self.device) if last_logits_only else 0
        with LayerCapture(self.layers, self.aux_layer_ids) as capture:
            out = self.model(
                input_ids=ids,
                attention_mask=self.kept.long(),
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        logits, aux = out.logits.float(), capture.stacked()
        rows = []
        for r, n in enumerate(sizes):
            row_logits = logits[r, last.index(max(n - 1, 0))][None] if last_logits_only else logits[r, :n]
            rows.append((row_logits, aux[r, :n]))
        return rows

    def _prefill_rows(
        self, chunks: Sequence[Sequence[int]], last_logits_only: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first chunks (the prompts), one row at a time, merged into one right-padded cache: a
        batched prefill would pad every prompt to the longest, and prefill is compute-bound."""
        width = max(len(c) for c in chunks)
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        keys: list[list[torch.Tensor]] = [[] for _ in self.layers]
        values: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for chunk in chunks:
            single = CachedVerifier(self.model, self.aux_layer_ids)
            rows += single.extend([chunk], last_logits_only)
            for index, layer in enumerate(single.cache.layers):
                pad = (0, 0, 0, width - len(chunk))  # the sequence axis of [1, heads, T, dim]
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
                    raise ValueError(f"evaluate: verifier cache layer {index} holds no attention keys/values")
                keys[index].append(torch.nn.functional.pad(k, pad))
                values[index].append(torch.nn.functional.pad(v, pad))
        for index in range(len(self.layers)):
            self.cache.update(torch.cat(keys[index]), torch.cat(values[index]), index)
        offsets = torch.arange(width, device=self.device)
        self.kept = offsets[None, :] < torch.tensor([len(c) for c in chunks], device=self.device)[:, None]
        return rows

    @torch.inference_mode()
    def reject(self, row: int, count: int) -> None:
        """Forget the last `count` kept tokens of `row` (rejected draft tokens): their slots are masked."""
        if count > 0 and self.windowed:
            self.cache.crop(self.kept.shape[1] - count)
            self.kept = self.kept[:, :-count]
        elif count > 0:
            slots = self.kept[row].nonzero().flatten()[-count:]
            self.kept[row, slots] = False


def has_sliding_window(model: PreTrainedModel) -> bool:
    """Whether any decoder layer of the verifier attends over a sliding window."""
    text = model.config.get_text_config()
    types = getattr(text, "layer_types", None)
    if types:
        return "sliding_attention" in types
    return (
        getattr(text, "sliding_window", None) is not None
        and getattr(text, "use_sliding_window", True) is not False
    )


def eos_ids(model: PreTrainedModel) -> set[int]:
    """End-of-sequence ids from the generation config (falling back to the model config)."""
    source = getattr(model, "generation_config", None)
    value = getattr(source, "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    return id_set(value)


def id_set(value: Any) -> set[int]:
    """An `eos_token_id`-style setting (unset, one id, or a list of ids) as a set."""
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}


def _finish(tokens: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], bool]:
    """Cut at the first EOS or the token budget; True when generation is over."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in eos:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.inference_mode()
def greedy_decode_batch(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: set[int],
    progress: DecodeProgress | None = None,
) -> list[list[int]]:
    """The verifier's own greedy continuation of each prompt (KV-cached, one token per row per forward)."""
    if len(prompts) > 1 and has_sliding_window(model):
        return [
            out for p in prompts for out in greedy_decode_batch(model, [p], max_new_tokens, eos, progress)
        ]
    runner = CachedVerifier(model, [0], rows=len(prompts))
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    chunks: list[list[int]] = [list(p) for p in prompts]
    while True:
        active = done.count(False)
        for r, (logits, _) in enumerate(runner.extend(chunks, last_logits_only=True)):
            if not done[r]:
                outs[r], done[r] = _finish([*outs[r], int(logits[-1].argmax())], max_new_tokens, eos)
        if progress is not None:
            progress.add(active, active - done.count(False))
        if all(done):
            return outs
        chunks = [[] if done[r] else outs[r][-1:] for r in range(len(prompts))]


def greedy_decode(
    model: PreTrainedModel, prompt: Sequence[int], max_new_tokens: int, eos: set[int]
) -> list[int]:
    """`greedy_decode_batch` for one prompt."""
    return greedy_decode_batch(model, [prompt], max_new_tokens, eos)[0]


@torch.inference_mode()
def speculative_decode_batch(
    model: PreTrainedModel,
    draft: Eagle3DraftModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    eos: set[int],
    progress: DecodeProgress | None = None,
) -> list[SpeculativeOutput]:
    """Greedy chain speculative decoding of several prompts: the draft proposes per row, the
    verifier checks every row's proposal in one forward."""
    if len(prompts) > 1 and has_sliding_window(model):
        return [
            o
            for p in prompts
            for o in speculative_decode_batch(model, draft, [p], max_new_tokens, k, eos, progress)
        ]
    aux_ids = draft.config.eagle_aux_hidden_state_layer_ids
    if not aux_ids:
        raise ValueError("the speculator's config has no eagle_aux_hidden_state_layer_ids")
    runner = CachedVerifier(model, aux_ids, rows=len(prompts))
    draft_device = next(draft.parameters()).device
    tokens = [list(p) for p in prompts]
    aux_states: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r, (logits, aux) in enumerate(runner.extend(tokens, last_logits_only=True)):
        tokens[r].append(int(logits[-1].argmax()))
        aux_states[r].append(aux)
    contexts = [draft.new_context() for _ in prompts]
    accepted: list[list[int]] = [[] for _ in prompts]
    done = [_finish(t[len(p) :], max_new_tokens, eos)[1] for t, p in zip(tokens, prompts, strict=True)]
    counted = 0

    def report_progress(active: int) -> None:
        """Tokens generated so far (as they will be returned: cut at EOS and the budget)."""
        nonlocal counted
        if progress is not None:
            now = sum(
                len(_finish(t[len(p) :], max_new_tokens, eos)[0])
                for t, p in zip(tokens, prompts, strict=True)
            )
            progress.add(now - counted, active - done.count(False))
            counted = now

    report_progress(len(prompts))
    while not all(done):
        active = done.count(False)
        chunks: list[list[int]] = []
        for r in range(len(prompts)):
            if done[r]:
                chunks.append([])
                continue
            features = torch.cat(aux_states[r]).to(draft_device)
            ids = torch.tensor([tokens[r]], dtype=torch.long, device=draft_device)
            proposal = draft.propose(ids, features[None], k, contexts[r])[0].tolist()
            chunks.append([tokens[r][-1], *proposal])
        for r, (logits, aux) in enumerate(runner.extend(chunks)):
            if done[r]:
                continue
            proposal, choices = chunks[r][1:], logits.argmax(-1).tolist()
            n_ok = 0
            while n_ok < k and proposal[n_ok] == choices[n_ok]:
                n_ok += 1
            accepted[r].append(n_ok)
            tokens[r].extend([*proposal[:n_ok], choices[n_ok]])
            runner.reject(r, k - n_ok)
            aux_states[r].append(aux[: 1 + n_ok])
            done[r] = _finish(tokens[r][len(prompts[r]) :], max_new_tokens, eos)[1]
        report_progress(active)
    return [
        SpeculativeOutput(tokens=_finish(t[len(p) :], max_new_tokens, eos)[0], accepted=a)
        for t, p, a in zip(tokens, prompts, accepted, strict=True)
    ]


def speculative_decode(
    model: PreTrainedModel,
    draft: Eagle3DraftModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    k: int,
    eos: set[int],
) -> SpeculativeOutput:
    """`speculative_decode_batch` for one prompt."""
    return speculative_decode_batch(model, draft, [prompt], max_new_tokens, k, eos)[0]


def evaluate(
    model: PreTrainedModel,
    draft: Eagle3DraftModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    k: int | None = None,
    check_lossless: bool = True,
    references: Sequence[Sequence[int]] | None = None,
    batch_size: int = 8,
    max_mismatch_rate: float | None = None,
    label: str = "draft",
) -> EvalReport:
    """Acceptance over `prompts` (token ids); k defaults to the speculator's `speculative_tokens`.

    `references` are the verifier's greedy outputs for the prompts (see `greedy_references`); pass
    them when evaluating several drafts on the same prompts so the verifier decodes them once.
    `batch_size` prompts are decoded together (results do not depend on it).
    `max_mismatch_rate` defaults to `default_max_mismatch_rate` of the verifier's dtype.
    Progress is logged as `evaluate <label>: prompt i/N done ...` (`DecodeProgress`).
    """
    if max_mismatch_rate is not None and not 0.0 <= max_mismatch_rate <= 1.0:
        raise ValueError(f"max_mismatch_rate must be in [0, 1], got {max_mismatch_rate}")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"evaluate: {len(references)} references for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("evaluate: empty prompt")
    steps = k if k is not None else draft.config.spec.speculative_tokens
    eos = eos_ids(model)
    began = time.perf_counter()
    per_position = [0] * steps
    drafts = accepted_tokens = generated = 0
    mismatched: list[int] = []
    first_mismatch: list[int] = []
    log.info(
        "evaluate %s: %d prompts, up to %d new tokens each, k = %d",
        label,
        len(prompts),
        max_new_tokens,
        steps,
    )
    progress = DecodeProgress(f"evaluate {label}", len(prompts), max_new_tokens)
    outputs = in_length_groups(
        prompts,
        batch_size,
        lambda group: speculative_decode_batch(model, draft, group, max_new_tokens, steps, eos, progress),
    )
    if check_lossless and references is None:
        references = greedy_references(model, prompts, max_new_tokens, batch_size)
    for index, out in enumerate(outputs):
        drafts += len(out.accepted)
        accepted_tokens += sum(out.accepted)
        generated += len(out.tokens)
        for n_ok in out.accepted:
            for j in range(n_ok):
                per_position[j] += 1
        if references is not None and check_lossless and out.tokens != list(references[index]):
            mismatched.append(index)
            first_mismatch.append(_first_difference(out.tokens, references[index]))
    return EvalReport(
        prompts=len(prompts),
        speculative_tokens=steps,
        drafts=drafts,
        accepted_tokens=accepted_tokens,
        acceptance_length=1.0 + accepted_tokens / drafts if drafts else 1.0,
        per_position=[c / drafts if drafts else 0.0 for c in per_position],
        accepted_per_position=per_position,
        generated_tokens=generated,
        lossless=not mismatched,
        mismatched_prompts=mismatched,
        first_mismatch=first_mismatch,
        mismatch_rate=round(len(mismatched) / len(prompts), 4),
        max_mismatch_rate=(
            default_max_mismatch_rate(next(model.parameters()).dtype)
            if max_mismatch_rate is None
            else max_mismatch_rate
        ),
        seconds=round(time.perf_counter() - began, 3),
    )


def draft_cost_ratio(verifier: PreTrainedModel, draft: Eagle3DraftModel) -> float:
    """Weights one draft step reads over those one verifier step reads, per token.

    Decoding a token is memory-bound, so this approximates a draft step's time in verifier steps.
    Embedding tables are looked up one row at a time, so they count only where the verifier ties
    its input embedding to its output head (then the head reads it whole)."""
    embedding = verifier.get_input_embeddings().weight
    head_weight = getattr(verifier.get_output_embeddings(), "weight", None)
    if not isinstance(embedding, torch.Tensor):
        raise ValueError("the verifier's input embedding has no weight tensor")
    tied = isinstance(head_weight, torch.Tensor) and head_weight.data_ptr() == embedding.data_ptr()
    verifier_reads = sum(p.numel() for p in verifier.parameters()) - (0 if tied else embedding.numel())
    draft_reads = sum(
        p.numel() for name, p in draft.named_parameters() if not name.startswith("embed_tokens.")
    )
    return draft_reads / verifier_reads


def estimated_speedup(acceptance_length: float, k: int, cost_ratio: float) -> float:
    """Tokens per verifier step over the time of one verifier step plus k draft steps: the usual
    memory-bound estimate (`acceptance_length / (1 + k * cost_ratio)`), not a measurement; it leaves
    out verification overhead, batching and the serving engine."""
    return acceptance_length / (1.0 + k * cost_ratio)


def _first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
        min(len(tokens), len(reference)),
    )


def greedy_references(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """The verifier's own greedy continuation of every prompt (the lossless check's reference)."""
    eos = eos_ids(model)
    progress = DecodeProgress("verifier greedy references", len(prompts), max_new_tokens)
    return in_length_groups(
        prompts, batch_size, lambda group: greedy_decode_batch(model, group, max_new_tokens, eos, progress)
    )


@dataclass
class PromptSet:
    """Evaluation prompts and where they came from (stated in every report)."""

    prompts: list[list[int]]
    source: dict[str, Any]
    """`data`, `split` (how the held-out conversations were chosen; None = the data as given),
    `held_out` (True: conversations the training's split kept out of training; None: unknown),
    `conversations` and `prompts` counts."""


def prompts_from_examples(
    token_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Held-out prompts from stored examples: every token before the first trained (assistant) token."""
    prompts = []
    for ids, mask in zip(token_ids, loss_masks, strict=True):
        first = next((i for i, m in enumerate(mask) if m), len(ids))
        if first > 0:
            prompts.append(list(ids[:first]))
    return prompts


def write_report(report: EvalReport, path: str | Path) -> None:
    """Save the report as JSON (temp file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    tmp.replace(target)


def load_prompts(
    path: str | Path,
    *,
    get_tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None,
    allowed_roots: Sequence[str | Path] = (),
    limit: int | None = None,
    field: str = "--data",
    split: HeldOutSplit | None = None,
) -> PromptSet:
    """Prompts as token ids from a DiskStore directory or a JSON/JSONL file.

    A DiskStore example yields its tokens before the first trained (assistant) token; with `split`
    only examples of held-out conversations do (the training's split: see `specops.data.split`).
    A file row is `{"prompt_ids": [...]}`, `{"messages": [{"role", "content"}, ...]}` (trailing
    assistant turns dropped, the tokenizer's chat template adds the generation prompt) or
    `{"prompt": "text"}`. The tokenizer is loaded (once) only when a text row needs it.
    """
    root = resolve_allowed(path, allowed_roots, field)
    if root.is_dir():
        return _store_prompts(root, allowed_roots, limit, field, split)
    if not root.is_file():
        raise FileNotFoundError(f"{field}: {root} does not exist")
    if split is not None:
        raise ValueError(
            f"{field}: {root} is a prompt file; a held-out split applies to a DiskStore directory"
        )
    prompts: list[list[int]] = []
    tokenizer = functools.cache(get_tokenizer) if get_tokenizer is not None else None
    for number, row in enumerate(_json_rows(root, field)):
        prompts.append(_row_prompt(row, tokenizer, f"{field}: {root} row {number}"))
        if limit is not None and len(prompts) >= limit:
            break
    source = {
        "data": str(root),
        "split": None,
        "held_out": None,
        "conversations": None,
        "prompts": len(prompts),
    }
    return PromptSet(prompts, source)


def _store_prompts(
    root: Path, allowed_roots: Sequence[str | Path], limit: int | None, field: str, split: HeldOutSplit | None
) -> PromptSet:
    """In partition order; with a split, only the shards that hold held-out ids are read."""
    from specops.stores.disk import DiskStore

    store = DiskStore.open(root, allowed_roots, field=field)
    prompts: list[list[int]] = []
    conversations: set[str] = set()
    for partition in sorted(store.partitions()):
        if limit is not None and len(prompts) >= limit:
            break
        if split is not None and not any(split.held_out(i) for i in store.ids(partition)):
            continue
        for example in store.read(partition):
            if split is not None and not split.held_out(example["id"]):
                continue
            found = prompts_from_examples([example["token_ids"].tolist()], [example["loss_mask"].tolist()])
            if found and (limit is None or len(prompts) < limit):
                prompts += found
                conversations.add(conversation_id(example["id"]))
    source = {
        "data": str(root),
        "split": split.to_json() if split is not None else None,
        "held_out": True if split is not None else None,
        "conversations": len(conversations),
        "prompts": len(prompts),
    }
    return PromptSet(prompts, source)


def _json_rows(file: Path, field: str) -> list[Any]:
    text = file.read_text()
    try:
        if file.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: {file} is not valid JSON: {exc}") from None
    return data if isinstance(data, list) else [data]


def _row_prompt(
    row: Any, get_tokenizer: Callable[[], PreTrainedTokenizerBase] | None, where: str
) -> list[int]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with prompt_ids, messages or prompt")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{where}: prompt_ids must be a non-empty list of token ids")
        return ids
    if "messages" not in row and not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: expected prompt_ids, messages or prompt, got keys {sorted(row)}")
    if get_tokenizer is None:
        raise ValueError(f"{where}: text prompts need the verifier tokenizer")
    tokenizer = get_tokenizer()
    if "messages" in row:
        messages = list(row["messages"])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages:
            raise ValueError(f"{where}: messages hold no turn before the answer")
    else:
        messages = [{"role": "user", "content": row["prompt"]}]
    if tokenizer.chat_template:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:
        text = "\n".join(str(m.get("content", "")) for m in messages)
    ids = list(tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"])
    if not ids:
        raise ValueError(f"{where}: the prompt tokenizes to nothing")
    return ids
