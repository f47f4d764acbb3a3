"""A tiny Llama verifier with its own BPE tokenizer and chat template, built offline in seconds.

The model is briefly trained on synthetic conversations so its greedy continuations carry structure
a draft can learn (an untrained verifier would make acceptance figures meaningless). The result is a
normal Hugging Face directory: `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)` load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from specops.paths import cache_dir
from specops.testing.synthetic import corpus, make_conversations

SPECIAL_TOKENS = (
    "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<think>", "</think>",
)  # fmt: skip

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3 style: role headers, trimmed content, `<|eot_id|>` ends a turn."""

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML / Qwen style."""

THINK_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
"""Qwen3 style: assistant turns after the last user message get an empty reasoning block, earlier
ones do not (history renders differently from the last turn)."""

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "think": THINK_TEMPLATE}


def build_tiny_tokenizer(
    out_dir: Path, *, vocab_size: int = 1024, template: str = "llama3", seed: int = 0
) -> Path:
    """A byte-level BPE trained on synthetic conversations, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(make_conversations(400, seed=seed)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>" if template == "llama3" else "<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<pad>", "<|begin_of_text|>")],
    )
    fast.chat_template = TEMPLATES[template]
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_verifier(
    out_dir: Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
    train_steps: int = 150,
    template: str = "llama3",
) -> Path:
    """Tokenizer + a LlamaForCausalLM trained `train_steps` steps on synthetic conversations."""
    from transformers import AutoTokenizer

    build_tiny_tokenizer(out_dir, template=template, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    with _one_thread():
        _build_model(tokenizer, out_dir, num_layers, hidden_size, seed, train_steps)
    return out_dir


@contextmanager
def _one_thread() -> Iterator[None]:
    """Matrices this small gain nothing from threads, which only thrash a busy machine; one thread
    also keeps the reduction order, hence the weights, independent of the core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build_model(
    tokenizer: Any, out_dir: Path, num_layers: int, hidden_size: int, seed: int, train_steps: int
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if train_steps:
        _train(model, tokenizer, train_steps, seed)
    model.save_pretrained(out_dir)


def _train(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    """Next-token training on rendered conversations; enough for stable, structured greedy output."""
    import torch

    rows = make_conversations(512, seed=seed + 1)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:128] for t in texts]
    pad = int(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(ids), (8,), generator=generator).tolist()
        width = max(len(ids[i]) for i in picks)
        batch = torch.full((len(picks), width), pad, dtype=torch.long)
        for row, i in enumerate(picks):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
        labels = batch.masked_fill(batch == pad, -100)
        loss = model(input_ids=batch, attention_mask=(batch != pad).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def tiny_verifier(template: str = "llama3", **kwargs: int) -> Path:
    """The tiny verifier from the SpecOps cache, built once per settings (safe under concurrency)."""
    key = hashlib.sha256(
        json.dumps({"template": template, "v": 2, **kwargs}, sort_keys=True).encode()
    ).hexdigest()[:12]
    target = cache_dir() / "testing" / f"tiny-verifier-{template}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_verifier(staging, template=template, **kwargs)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
