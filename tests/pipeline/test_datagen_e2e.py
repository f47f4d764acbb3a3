"""End to end on CPU: `specops generate-data` with 2 workers on the tiny verifier, read back through
GeneratedDataset, checked against a direct model forward and the assistant turns; then a worker is
killed with SIGKILL mid-run and a rerun must give exactly the same example set, byte for byte."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from specops.config import DatasetSource, ProcessorConfig
from specops.data.chat import tokenize_conversation
from specops.data.records import Conversation
from specops.data.sources import iter_conversations
from specops.dataset import GeneratedDataset
from specops.generate import in_slice
from specops.stores.disk import DiskStore
from specops.testing.synthetic import make_conversations, write_jsonl

LAYERS = [1, 2, 3, 4]  # the tiny verifier has 4 layers: 4 = final output before the norm
NUM_CONVERSATIONS = 80
CLI = [sys.executable, "-m", "specops.cli"]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("data") / "syn.jsonl", make_conversations(NUM_CONVERSATIONS, seed=5)
    )


def write_config(
    tmp: Path, verifier: Path, data: Path, out: Path, *, batch_size: int, shard_size: int
) -> Path:
    config = {
        "verifier": {"nameOrPath": str(verifier)},
        "datasets": [{"path": str(data), "name": "syn"}],
        "states": {"hiddenStates": {"layers": LAYERS}},
        "engine": {"device": "cpu", "batchSize": batch_size},
        "sync": {"kind": "disk", "path": str(out), "shardSize": shard_size},
        "run": {"numWorkers": 2, "allowedRoots": [str(tmp), str(verifier), str(data.parent)]},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "generate-data", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return proc.returncode, report, err


def stored(out: Path, root: Path) -> dict[str, dict[str, Any]]:
    """Every example, read back through GeneratedDataset, as bytes per field."""
    dataset = GeneratedDataset(DiskStore.open(out, [root], verify="digest"), shuffle=False)
    examples: dict[str, dict[str, Any]] = {}
    for example in dataset:
        assert example["id"] not in examples, f"{example['id']} delivered twice"
        examples[example["id"]] = {k: v.clone() for k, v in example.items() if k != "id"}
    return examples


def as_bytes(examples: dict[str, dict[str, Any]]) -> dict[str, tuple[bytes, ...]]:
    return {i: tuple(t.numpy().tobytes() for _, t in sorted(e.items())) for i, e in examples.items()}


def expected_examples(verifier: Path, data: Path) -> tuple[dict[str, Conversation], dict[str, list[int]]]:
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    source = DatasetSource(path=str(data), name="syn")
    convs = {c.id: c for c in iter_conversations(source, 0, [str(data.parent)])}
    tokens = {}
    for cid, conv in convs.items():
        example = tokenize_conversation(tokenizer, conv, ProcessorConfig())
        assert example is not None
        tokens[cid] = example.token_ids
    return convs, tokens


@pytest.mark.usefixtures("one_thread")
def test_generate_two_workers_readback_and_kill_resume(
    tmp_path: Path, tiny_verifier_dir: Path, conversations: Path
) -> None:
    verifier_dir = tiny_verifier_dir
    convs, tokens = expected_examples(verifier_dir, conversations)
    assert len(convs) == NUM_CONVERSATIONS

    # ---- a clean run with 2 workers
    clean = tmp_path / "clean"
    code, report, err = finish(
        cli(write_config(tmp_path, verifier_dir, conversations, clean, batch_size=4, shard_size=8))
    )
    assert code == 0, err
    assert (report["written"], report["skipped"], report["dropped"], report["ok"]) == (
        NUM_CONVERSATIONS,
        0,
        0,
        True,
    )
    assert report["tokens"] == sum(len(t) for t in tokens.values())
    assert sorted(p.name for p in clean.glob("manifest-w*.json")) == [
        "manifest-w00000.json",
        "manifest-w00001.json",
    ]
    assert (clean / "manifest.json").is_file(), "both writers finished: the merged manifest exists"
    examples = stored(clean, tmp_path)
    assert set(examples) == set(convs)

    # ---- hidden states equal a direct forward; the mask is exactly the assistant turns
    model = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(verifier_dir)
    for cid in list(convs)[:20]:
        example = examples[cid]
        assert example["token_ids"].tolist() == tokens[cid]
        with torch.no_grad():
            ref = model(torch.tensor([tokens[cid]]), output_hidden_states=True).hidden_states
        hidden = example["hidden_states"]
        assert hidden.shape == (len(tokens[cid]), len(LAYERS), model.config.hidden_size)
        for slot, k in enumerate(LAYERS[:-1]):
            torch.testing.assert_close(hidden[:, slot], ref[k][0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model.model.norm(hidden[:, -1]), ref[4][0], rtol=1e-5, atol=1e-5)
        ids, mask = example["token_ids"].tolist(), example["loss_mask"].tolist()
        runs = [m.group() for m in re.finditer("1+", "".join(map(str, mask)))]
        starts = [m.start() for m in re.finditer("1+", "".join(map(str, mask)))]
        trained = [tokenizer.decode(ids[s : s + len(r)]) for s, r in zip(starts, runs, strict=True)]
        assistant = [m.content.strip() + "<|eot_id|>" for m in convs[cid].messages if m.role == "assistant"]
        assert trained == assistant, cid

    # ---- kill -9 one worker mid-run (other batch and shard sizes), then rerun the same command
    resumed = tmp_path / "resumed"
    config = write_config(tmp_path, verifier_dir, conversations, resumed, batch_size=2, shard_size=1)
    proc = cli(config)
    pids: dict[int, int] = {}
    stderr_lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)
            if found := re.search(r"worker (\d+) \(slice \d+/\d+\): pid (\d+)", line):
                pids[int(found[1])] = int(found[2])

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    manifest = resumed / "manifest-w00000.json"
    deadline = time.monotonic() + 90
    while not (0 in pids and manifest.exists()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert 0 in pids and manifest.exists(), "".join(stderr_lines)
    os.kill(pids[0], signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    assert proc.returncode == 1, "".join(stderr_lines)
    killed_report = json.loads(stdout.strip().splitlines()[-1])
    assert not killed_report["ok"]
    assert killed_report["worker_errors"] == [f"worker pid {pids[0]} (slice 0/2) was killed by signal 9"]
    slice0 = {i for i in convs if in_slice(i, 0, 2)}
    partial = DiskStore.open(resumed, [tmp_path]).done_ids()
    assert 0 < len(partial & slice0) < len(slice0), "the kill must land mid-run"
    assert not (resumed / "manifest.json").exists()

    code, report, err = finish(cli(config))
    assert code == 0, err
    assert report["skipped"] == len(partial) and report["written"] == NUM_CONVERSATIONS - len(partial)
    assert as_bytes(stored(resumed, tmp_path)) == as_bytes(examples)
