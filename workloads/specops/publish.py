"""Publishing a trained speculator: a model card, and an upload to the Hugging Face Hub or an
object store.

The Hub upload is `huggingface_hub`'s own (`create_repo` + `create_commit`), so `HF_TOKEN` and
`HF_ENDPOINT` apply as for downloads. The object-store upload goes through `fsspec` (`s3fs`), so
the AWS_* variables (or the pod's workload identity) apply. Only what vLLM and
`SpeculatorModel.from_pretrained` read goes up (config.json, model.safetensors) plus the generated
README.md: never optimizer state or anything pickled.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specops.config import HUB_REPO_PATTERN, ConfigError, ExportConfig
from specops.models.config import WEIGHTS_NAME
from specops.serving import vllm_serve_command

REPO_ID = re.compile(HUB_REPO_PATTERN)
CARD_NAME = "README.md"
UPLOADED = ("config.json", WEIGHTS_NAME, CARD_NAME)


@dataclass(frozen=True)
class Published:
    """Where a push landed (the JSON line `specops push` prints)."""

    url: str
    commit: str | None
    """The Hub commit; None for an object store (its objects have no common revision)."""
    files: list[str]


def read_speculator_config(directory: Path) -> dict[str, Any]:
    """config.json of a speculator directory; a clear error for anything else."""
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    if not config_file.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: not a speculator (needs config.json and {WEIGHTS_NAME})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_file}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or not config.get("speculators_model_type"):
        raise ConfigError(f"{config_file}: no speculators_model_type (not a speculators checkpoint)")
    return config


def model_card(config: Mapping[str, Any], repo_id: str, evaluation: Mapping[str, Any] | None = None) -> str:
    """README.md for the Hub: what the draft is for, how it was measured, how to serve it."""
    spec = config.get("speculators_config") or {}
    verifier = str((spec.get("verifier") or {}).get("name_or_path", "unknown"))
    methods = spec.get("proposal_methods") or [{}]
    k = int(methods[0].get("speculative_tokens", 3))
    algorithm = str(spec.get("algorithm", config["speculators_model_type"]))
    layers = (config.get("transformer_layer_config") or {}).get("num_hidden_layers", 1)
    from specops import __version__

    lines = [
        "---",
        "library_name: speculators",
        f"base_model: {json.dumps(verifier)}",
        "tags: [speculators, speculative-decoding, " + algorithm + ", specops]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"An {algorithm.upper()} draft ({layers} layer(s), {k} speculative tokens) for "
        f"`{verifier}`, in the speculators format that vLLM loads. Trained with SpecOps.",
        "",
        "| | |",
        "| --- | --- |",
        f"| verifier | `{verifier}` |",
        f"| draft vocabulary | {config.get('draft_vocab_size', 'full')} |",
        f"| verifier layers read | {config.get('eagle_aux_hidden_state_layer_ids', 'default')} |",
        f"| versions | specops {__version__}, Python {platform.python_version()} |",
        "",
    ]
    if evaluation:
        positions = evaluation.get("per_position") or []
        lines += [
            "## Acceptance",
            "",
            f"Measured with `specops evaluate` on {evaluation.get('prompts', '?')} prompt(s): acceptance "
            f"length **{float(evaluation.get('acceptance_length', 0.0)):.3f}** (tokens per verifier step), "
            f"lossless: {bool(evaluation.get('lossless'))}.",
            "",
            "| draft position | " + " | ".join(str(i + 1) for i in range(len(positions))) + " |",
            "| --- |" + " --- |" * len(positions),
            "| accepted | " + " | ".join(f"{float(p):.3f}" for p in positions) + " |",
            "",
        ]
    lines += [
        "## Serve",
        "",
        "```bash",
        vllm_serve_command(verifier, repo_id, k),
        "```",
        "",
    ]
    return "\n".join(lines)


def push(
    directory: Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Published:
    """Upload config, weights and a model card to `repo_id` (created when missing)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    config = read_speculator_config(directory)
    card = model_card(config, repo_id, evaluation).encode()
    operations = [CommitOperationAdd(name, directory / name) for name in ("config.json", WEIGHTS_NAME)]
    operations.append(CommitOperationAdd(CARD_NAME, card))  # from memory: the directory stays as it was
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            revision=revision,
            commit_message=message or f"Upload {config['speculators_model_type']} speculator (SpecOps)",
        )
    except RevisionNotFoundError:
        raise ConfigError(f"--revision {revision}: no such branch in {repo_id} (create it first)") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise ConfigError(
                f"--repo {repo_id}: the Hub refused the upload (set HF_TOKEN to a token with write access)"
            ) from None
        raise ConnectionError(f"--repo {repo_id}: upload failed: {exc}") from None
    return Published(url=str(repo), commit=info.oid, files=sorted(UPLOADED))


def push_to_store(
    directory: Path,
    uri: str,
    *,
    endpoint_url: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Published:
    """Upload config, weights and a model card under the object-store prefix `uri` (the bucket
    must exist). Weights go first and the card last, so a reader that finds config.json finds the
    weights too; each object's size is read back before the push counts as done."""
    import fsspec

    config = read_speculator_config(directory)
    card = model_card(config, uri, evaluation).encode()
    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    fs, root = fsspec.core.url_to_fs(uri, **options)
    root = root.rstrip("/")
    sizes = {name: (directory / name).stat().st_size for name in (WEIGHTS_NAME, "config.json")}
    sizes[CARD_NAME] = len(card)
    try:
        for name in (WEIGHTS_NAME, "config.json"):
            fs.put_file(str(directory / name), f"{root}/{name}")
        fs.pipe_file(f"{root}/{CARD_NAME}", card)
        fs.invalidate_cache()
        stored = {name: int(fs.info(f"{root}/{name}")["size"]) for name in sizes}
    except PermissionError as exc:
        raise ConfigError(
            f"--to {uri}: the object store refused the upload ({exc}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY to credentials that may write there)"
        ) from None
    except FileNotFoundError as exc:
        raise ConfigError(f"--to {uri}: no such bucket ({exc}); create it first") from None
    except OSError as exc:
        raise ConnectionError(f"--to {uri}: upload failed: {exc}") from None
    if stored != sizes:
        raise ConnectionError(f"--to {uri}: stored sizes {stored} differ from the files' {sizes}")
    return Published(url=uri.rstrip("/"), commit=None, files=sorted(UPLOADED))


def publish(directory: Path, target: ExportConfig, evaluation: Mapping[str, Any] | None = None) -> Published:
    """Upload to the target an `export` section names (its Hub repository or its object-store prefix)."""
    if target.hub is not None:
        hub = target.hub
        return push(directory, hub.repo, revision=hub.revision, private=hub.private, evaluation=evaluation)
    if target.uri is None:
        raise ConfigError("export: set hub or uri")
    return push_to_store(directory, target.uri, endpoint_url=target.endpoint_url, evaluation=evaluation)
