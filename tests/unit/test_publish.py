"""`specops push` and Hub ids in `from_pretrained`, through the real `huggingface_hub` client and a
local Hub stand-in (FakeHub with uploads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _models_support import build_verifier, new_draft

from specops.publish import model_card
from specops.testing.hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
REPORT = {"prompts": 12, "acceptance_length": 2.25, "per_position": [0.8, 0.5, 0.2], "lossless": True}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """In a fresh process: huggingface_hub reads HF_ENDPOINT and HF_HOME at import."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return subprocess.run(
        [sys.executable, *args], env={**clean, **env}, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def speculator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("publish")
    verifier = build_verifier(root / "verifier")
    directory = root / "final"
    new_draft(verifier, root / "verifier").save_pretrained(directory)
    (directory / "optimizer.pt").write_bytes(b"never uploaded")
    (root / "eval.json").write_text(json.dumps(REPORT))
    return directory


def test_push_uploads_the_speculator_with_a_card_and_a_hub_id_loads_it_back(
    speculator: Path, tmp_path: Path
) -> None:
    push = ["-m", "specops.cli", "push", str(speculator), "--repo", "acme/tiny-eagle3"]
    push += ["--eval-report", str(speculator.parent / "eval.json"), "--allowed-root", str(speculator.parent)]
    with FakeHub({}, token="write-token", uploads=tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        refused = _run(push, env)
        assert refused.returncode == 2, refused.stderr
        assert "the Hub refused the upload (set HF_TOKEN to a token with write access)" in refused.stderr
        assert "Traceback" not in refused.stderr

        pushed = _run(push, {**env, "HF_TOKEN": "write-token"})
        assert pushed.returncode == 0, pushed.stderr
        line = json.loads(pushed.stdout.strip().splitlines()[-1])
        repo = hub.repos["acme/tiny-eagle3"]
        assert line == {
            "url": f"{hub.url}/acme/tiny-eagle3",
            "commit": repo.commit,
            "files": ["README.md", "config.json", "model.safetensors"],
        }
        assert sorted(repo.files) == line["files"]  # not optimizer.pt
        assert not (speculator / "README.md").exists(), "the card is uploaded, not written into the draft"
        for name in ("config.json", "model.safetensors"):
            assert repo.files[name].read_bytes() == (speculator / name).read_bytes()
        card = repo.files["README.md"].read_text()
        assert (
            "base_model:" in card and "acceptance length **2.250**" in card and "| accepted | 0.800 |" in card
        )
        assert "vllm serve" in card and "acme/tiny-eagle3" in card

        loader = (
            "import sys, torch; from specops.models.base import SpeculatorModel\n"
            "a = SpeculatorModel.from_pretrained(sys.argv[1]); b = SpeculatorModel.from_pretrained(sys.argv[2])\n"
            "sa, sb = a.state_dict(), b.state_dict()\n"
            "assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)\n"
            "print(type(a).__name__)\n"
        )
        fresh = {**env, "HF_TOKEN": "write-token", "HF_HOME": str(tmp_path / "fresh")}
        loaded = _run(["-c", loader, "acme/tiny-eagle3", str(speculator)], fresh)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.strip() == "Eagle3DraftModel"
        assert hub.downloads["acme/tiny-eagle3"] >= 2  # config and weights came over HTTP
        # An evaluation pod with spec.modelCache: the shared cache holds the verifier only, so a
        # speculator named by Hub id still downloads into the pod's own cache.
        (tmp_path / "verifier-cache").mkdir()
        pod = {
            **fresh,
            "HF_HOME": str(tmp_path / "pod"),
            "SPECOPS_MODEL_CACHE": str(tmp_path / "verifier-cache"),
        }
        in_pod = _run(["-c", loader, "acme/tiny-eagle3", str(speculator)], pod)
        assert in_pod.returncode == 0, in_pod.stderr
        assert not any((tmp_path / "verifier-cache").iterdir()), "the verifier's cache is not written"

        missing = _run(["-c", loader, "acme/nothing", str(speculator)], fresh)
        assert "speculator: 'acme/nothing': no such model on the Hub" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo", "no-org"], "--repo: 'no-org' is not a Hub repository id (ORG/NAME)"),
        (["--repo", "acme/x", "--eval-report", "/nonexistent.json"], "--eval-report"),
    ],
)
def test_push_refuses_bad_arguments_with_exit_2(speculator: Path, args: list[str], message: str) -> None:
    where = ["--allowed-root", str(speculator.parent)]
    result = _run(
        ["-m", "specops.cli", "push", str(speculator), *where, *args], {"HF_ENDPOINT": "http://127.0.0.1:9"}
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_push_refuses_a_directory_that_is_not_a_speculator(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    result = _run(
        ["-m", "specops.cli", "push", str(tmp_path), "--repo", "acme/x", "--allowed-root", str(tmp_path)], {}
    )
    assert (
        result.returncode == 2
        and "not a speculator (needs config.json and model.safetensors)" in result.stderr
    )


def test_the_card_without_an_evaluation_has_no_acceptance_section() -> None:
    config = {
        "speculators_model_type": "eagle3",
        "speculators_config": {"verifier": {"name_or_path": "org/v"}},
    }
    card = model_card(config, "acme/d")
    assert "## Acceptance" not in card and 'base_model: "org/v"' in card and "## Serve" in card


# --------------------------------------------------------------------------- object store

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A local S3 server (moto in server mode) with the bucket `drafts`; its endpoint URL."""
    boto3 = pytest.importorskip("boto3", reason="the test extra's moto[server] (with boto3) is not installed")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **_keys())
    client.create_bucket(Bucket="drafts")
    yield url
    server.stop()


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def test_push_to_an_object_store_uploads_the_speculator_and_its_card(speculator: Path, s3: str) -> None:
    import boto3

    push = ["-m", "specops.cli", "push", str(speculator), "--to", "s3://drafts/llama/eagle3/"]
    push += ["--endpoint-url", s3, "--eval-report", str(speculator.parent / "eval.json")]
    result = _run([*push, "--allowed-root", str(speculator.parent)], S3_ENV)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line == {
        "url": "s3://drafts/llama/eagle3",
        "commit": None,
        "files": ["README.md", "config.json", "model.safetensors"],
    }
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **_keys())
    listed = client.list_objects_v2(Bucket="drafts", Prefix="llama/eagle3/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "llama/eagle3/README.md",
        "llama/eagle3/config.json",
        "llama/eagle3/model.safetensors",
    ], "exactly these: no optimizer.pt"
    for name in ("config.json", "model.safetensors"):
        stored = client.get_object(Bucket="drafts", Key=f"llama/eagle3/{name}")["Body"].read()
        assert stored == (speculator / name).read_bytes()
    card = client.get_object(Bucket="drafts", Key="llama/eagle3/README.md")["Body"].read().decode()
    assert "acceptance length **2.250**" in card and "s3://drafts/llama/eagle3" in card
    assert not (speculator / "README.md").exists()


def test_push_to_a_missing_bucket_fails_with_one_line_and_exit_2(speculator: Path, s3: str) -> None:
    push = [
        "-m",
        "specops.cli",
        "push",
        str(speculator),
        "--to",
        "s3://no-such-bucket/x",
        "--endpoint-url",
        s3,
    ]
    result = _run([*push, "--allowed-root", str(speculator.parent)], S3_ENV)
    assert result.returncode == 2, result.stderr
    assert "--to s3://no-such-bucket/x: no such bucket" in result.stderr and "Traceback" not in result.stderr


def test_push_with_credentials_the_store_refuses_fails_with_one_line_and_exit_2(
    speculator: Path, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks signatures against its IAM users (none has the key `testing`): a 403."""
    import boto3
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    push = ["-m", "specops.cli", "push", str(speculator), "--to", "s3://drafts/refused", "--endpoint-url", s3]
    result = _run([*push, "--allowed-root", str(speculator.parent)], S3_ENV)
    assert result.returncode == 2, result.stderr
    assert "--to s3://drafts/refused: the object store refused the upload" in result.stderr
    assert "AWS_ACCESS_KEY_ID" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.undo()
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **_keys())
    assert "Contents" not in client.list_objects_v2(Bucket="drafts", Prefix="refused/"), "nothing stored"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--to", "gs://bucket/x"],
            "--to: 'gs://bucket/x' is not an object-store prefix (s3://BUCKET/PREFIX)",
        ),
        (["--to", "s3://b-1/x", "--private"], "--revision, --private and --message apply to --repo only"),
        (["--repo", "acme/x", "--endpoint-url", "http://h"], "--endpoint-url applies to --to only"),
        (
            ["--to", "s3://b-1/x", "--endpoint-url", "ftp://h"],
            "--endpoint-url: 'ftp://h' is not an http(s) URL",
        ),
    ],
)
def test_push_refuses_mixed_or_bad_object_store_arguments(
    speculator: Path, args: list[str], message: str
) -> None:
    result = _run(
        ["-m", "specops.cli", "push", str(speculator), "--allowed-root", str(speculator.parent), *args], {}
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_local_run_with_spec_export_uploads_only_a_draft_that_passed(
    speculator: Path, s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`specops run` honours the CR's `spec.export` (credentials from the environment): the same
    YAML a cluster runs uploads the same files, after the same evaluation gate."""
    import boto3
    import yaml

    from specops.local_run import export_speculator, plan_local

    cr = yaml.safe_load((ROOT / "examples" / "local" / "smollm2-sharegpt.yaml").read_text())
    cr["spec"]["export"] = {
        "uri": "s3://drafts/local-run",
        "endpointUrl": s3,
        "credentialsSecret": {"name": "x"},
    }
    (tmp_path / "cr.yaml").write_text(yaml.safe_dump(cr))
    plan = plan_local(tmp_path / "cr.yaml", tmp_path / "out")
    assert plan.export is not None and plan.export.uri == "s3://drafts/local-run"
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)

    failed = {"evaluation": {"trained": REPORT}, "better_than_baseline": False, "lossless": True}
    assert export_speculator(plan.export, speculator, failed) is None
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **_keys())
    assert "Contents" not in client.list_objects_v2(Bucket="drafts", Prefix="local-run/")

    passed = {**failed, "better_than_baseline": True}
    published = export_speculator(plan.export, speculator, passed)
    assert published == {
        "url": "s3://drafts/local-run",
        "commit": None,
        "files": ["README.md", "config.json", "model.safetensors"],
    }
    stored = client.get_object(Bucket="drafts", Key="local-run/model.safetensors")["Body"].read()
    assert stored == (speculator / "model.safetensors").read_bytes()


def test_push_to_a_branch_that_does_not_exist_fails_with_exit_2(speculator: Path, tmp_path: Path) -> None:
    """`--revision` (`spec.export.hub.revision`) commits to an existing branch; a missing one is
    refused by the Hub and named, not retried as a network failure."""
    push = ["-m", "specops.cli", "push", str(speculator), "--repo", "acme/branches"]
    push += ["--allowed-root", str(speculator.parent)]
    with FakeHub({}, token="t", uploads=tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "t"}
        missing = _run([*push, "--revision", "dev"], env)
        assert missing.returncode == 2, missing.stderr
        assert "--revision dev: no such branch in acme/branches (create it first)" in missing.stderr
        assert "Traceback" not in missing.stderr and hub.commits == []
        main = _run([*push, "--revision", "main"], env)
        assert main.returncode == 0, main.stderr
        assert sorted(hub.repos["acme/branches"].files) == ["README.md", "config.json", "model.safetensors"]
