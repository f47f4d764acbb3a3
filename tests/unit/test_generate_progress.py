"""A running generator shows its total and ETA (bar and log) and serves its progress as Prometheus
metrics; the broker serves its own; the chart's data-generation dashboard draws only those."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from specops import generate_progress
from specops.generate import generate_data
from specops.generate_progress import METRIC_NAMES
from specops.stores.broker import Broker, BrokerConfig
from specops.stores.disk import DiskStore
from specops.stores.wire import Timing
from specops.stores.zmq import ZmqSource, ZmqStore
from specops.testing.net import free_port
from specops.testing.synthetic import make_conversations, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "specops" / "dashboards" / "specops-datagen.json"
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _config(root: Path, verifier: Path, sync: dict[str, Any], port: int, samples: int) -> dict[str, Any]:
    return {
        "verifier": {"nameOrPath": str(verifier)},
        "datasets": [{"path": str(root / "syn.jsonl"), "name": "syn", "maxSamples": samples}],
        "states": {"hiddenStates": {"layers": [1, 4]}},
        "engine": {"device": "cpu", "batchSize": 2},
        "sync": sync,
        "run": {"allowedRoots": [str(root), str(verifier)]},
        "metrics": {"port": port},
    }


def _scraping_writes(
    monkeypatch: pytest.MonkeyPatch, sink_class: type, port: int, scrapes: list[Scrape], method: str = "write"
) -> None:
    """Scrape the generator's endpoint at each write into `sink_class`, from inside the run."""
    original = getattr(sink_class, method)

    def write(self: Any, examples: Any) -> None:
        scrapes.append(_scrape(port))
        original(self, examples)

    monkeypatch.setattr(sink_class, method, write)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory: pytest.TempPathFactory, tiny_verifier_dir: Path) -> dict[str, Any]:
    """12 conversations, 4 of them stored by an earlier run; the rerun is scraped at every write."""
    root = tmp_path_factory.mktemp("genprogress")
    write_jsonl(root / "syn.jsonl", make_conversations(12, seed=4))
    sync = {"path": str(root / "out"), "shardSize": 4}
    generate_data(_config(root, tiny_verifier_dir, sync, free_port(), 4))  # type: ignore[arg-type]
    port, scrapes, lines = free_port(), [], []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("specops.generate_progress").addHandler(handler)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(generate_progress, "LOG_EVERY_S", 0.0)
        logger = logging.getLogger("specops.generate_progress")
        patch.setattr(logger, "level", logging.INFO)
        logger.manager._clear_cache()
        _scraping_writes(patch, DiskStore, port, scrapes)
        report = generate_data(_config(root, tiny_verifier_dir, sync, port, 12))  # type: ignore[arg-type]
    logging.getLogger("specops.generate_progress").removeHandler(handler)
    return {"port": port, "scrapes": scrapes, "report": report, "lines": lines, "stderr": err.getvalue()}


def test_a_running_generator_serves_its_progress(on_disk: dict[str, Any]) -> None:
    scrapes, report, slice0 = on_disk["scrapes"], on_disk["report"], (("slice", "0"),)
    assert (report.written, report.skipped) == (8, 4)
    written = [got[("specops_generate_examples_written_total", slice0)] for got in scrapes]
    assert written[0] == 0 and written == sorted(written) and written[-1] < 8  # scraped before each write
    for got, done in zip(scrapes, written, strict=True):
        assert got[("specops_generate_examples_expected", slice0)] == 8  # the 4 stored are not in it
        assert got[("specops_generate_examples_skipped_total", slice0)] == 4
        assert got[("specops_generate_examples_processed", slice0)] == done
        assert got[("specops_generate_examples_stored", slice0)] == 4 * (done // 4)  # shards of 4
        assert got[("specops_generate_examples_failed_total", slice0)] == 0
    assert scrapes[0][("specops_generate_tokens_total", slice0)] == 0
    assert scrapes[-1][("specops_generate_tokens_total", slice0)] > 0
    assert scrapes[-1][("specops_generate_tokens_per_second", slice0)] > 0
    assert scrapes[-1][("specops_generate_eta_seconds", slice0)] > 0
    served = {name for name, _ in scrapes[-1]}
    assert served == set(METRIC_NAMES), "METRIC_NAMES lists exactly what a disk generator serves"
    assert not any(name.startswith("specops_generate_answers_") for name in served), "no regenerate"
    with pytest.raises(urllib.error.URLError):  # the endpoint ends with the slice
        _scrape(on_disk["port"])


def test_the_bar_and_the_log_show_the_total_and_an_eta(on_disk: dict[str, Any]) -> None:
    assert "slice 0/1: 100%" in on_disk["stderr"] and "8/8" in on_disk["stderr"]
    lines = [line for line in on_disk["lines"] if line.startswith("slice 0/1: ")]
    assert re.fullmatch(
        r"slice 0/1: [1-7]/8 examples, [\d.]+ examples/s, \d+ tokens/s, ETA \d\d:\d\d", lines[0]
    )
    assert re.fullmatch(r"slice 0/1: 8/8 examples, .* ETA 00:00", lines[-1])


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, tiny_verifier_dir: Path) -> dict[str, Any]:
    """A generator streaming 6 examples through a broker to a consumer; both endpoints scraped."""
    root = tmp_path_factory.mktemp("genstream")
    write_jsonl(root / "syn.jsonl", make_conversations(6, seed=5))
    fast = Timing(heartbeat_s=0.1, timeout_s=2.0)
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", metrics_port=0, max_bytes=1 << 26, timing=fast))
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    consumed: list[str] = []
    source = ZmqSource(broker.endpoint, timeout_s=30)
    reader = threading.Thread(target=lambda: consumed.extend(ex["id"] for ex in source), daemon=True)
    reader.start()
    port, scrapes = free_port(), []
    try:
        with pytest.MonkeyPatch.context() as patch:
            _scraping_writes(patch, ZmqStore, port, scrapes)
            sync = {"kind": "zmq", "url": broker.endpoint}
            generate_data(_config(root, tiny_verifier_dir, sync, port, 6))  # type: ignore[arg-type]
        reader.join(30)
        broker._update_gauges()
        assert broker._metrics is not None
        broker_scrape = _scrape(broker._metrics.port)
    finally:
        source.close()
        broker.stop()
        thread.join(10)
    return {"generator": scrapes, "broker": broker_scrape, "consumed": consumed}


@pytest.fixture(scope="module")
def answering(tmp_path_factory: pytest.TempPathFactory, tiny_verifier_dir: Path) -> list[Scrape]:
    """A generator that answers 6 prompts first (windows of 4 then 2), scraped at each window."""
    from specops.regenerate import AnswerFiles

    root = tmp_path_factory.mktemp("genanswers")
    write_jsonl(root / "syn.jsonl", make_conversations(6, seed=7))
    port, scrapes = free_port(), []
    cfg = _config(root, tiny_verifier_dir, {"path": str(root / "out")}, port, 6)
    cfg["regenerate"] = {"path": str(root / "answers"), "maxNewTokens": 8, "batchSize": 1}
    with pytest.MonkeyPatch.context() as patch:
        _scraping_writes(patch, AnswerFiles, port, scrapes, method="append")
        generate_data(cfg)  # type: ignore[arg-type]
    return scrapes


def test_a_streaming_generator_serves_its_sink_figures_too(streamed: dict[str, Any]) -> None:
    assert len(streamed["consumed"]) == 6
    last = streamed["generator"][-1]
    written = last[("specops_generate_examples_written_total", (("slice", "0"),))]
    assert 0 < written < 6  # scraped before the last write
    assert last[("specops_stream_written_examples_total", (("role", "producer"),))] == written
    assert streamed["broker"][("specops_stream_delivered_examples_total", (("role", "broker"),))] == 6


def test_every_metric_the_datagen_dashboard_draws_is_served(
    on_disk: dict[str, Any], streamed: dict[str, Any], answering: list[Scrape]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if "query" in v and v["type"] == "query"]
    drawn = {name for expr in exprs for name in re.findall(r"\bspecops_(?:generate|stream)_\w+", expr)}
    served = {
        name
        for scrape in (on_disk["scrapes"][-1], streamed["generator"][-1], streamed["broker"], *answering)
        for name, _ in scrape
    }
    assert drawn and drawn <= served, sorted(drawn - served)
    assert {"specops_generate_examples_expected", "specops_generate_eta_seconds"} <= drawn
    assert {"specops_generate_answers_done", "specops_generate_answers_eta_seconds"} <= drawn
    assert {
        "specops_stream_producers",
        "specops_stream_stalls_total",
        "specops_stream_in_bytes_total",
    } <= drawn


def test_regeneration_shows_its_total_and_eta_logs_a_done_line_and_serves_its_counts(
    tmp_path: Path,
    tiny_verifier_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rerun whose answers file holds 4 of 10 conversations answers 6: the bar's total (the
    capture's is the 10 the new sink lacks), progress lines, the done line, the served counters."""
    from specops.regenerate import AnswerFiles

    write_jsonl(tmp_path / "syn.jsonl", make_conversations(10, seed=6))

    def config(out: str, samples: int, port: int | None) -> dict[str, Any]:
        cfg = _config(tmp_path, tiny_verifier_dir, {"path": str(tmp_path / out)}, 0, samples)
        answers = {"path": str(tmp_path / "answers"), "maxNewTokens": 8, "batchSize": 1}
        return {**cfg, "regenerate": answers, "metrics": {"port": port}}

    first = generate_data(config("first", 4, None))  # type: ignore[arg-type]
    assert first.regenerated == 4
    port, scrapes = free_port(), []
    _scraping_writes(monkeypatch, AnswerFiles, port, scrapes, method="append")
    monkeypatch.setattr(generate_progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="specops.generate_progress")
    caplog.clear()
    capsys.readouterr()
    report = generate_data(config("second", 10, port))  # type: ignore[arg-type]

    assert (report.regenerated, report.written) == (6, 10)
    err = capsys.readouterr().err
    assert "slice 0/1 answers: 100%" in err and "6/6" in err  # windows of 4: 4 then 2
    assert "slice 0/1: 100%" in err and "10/10" in err  # the capture's own bar
    lines = [m for m in caplog.messages if m.startswith("slice 0/1 answers: ")]
    assert re.fullmatch(
        r"slice 0/1 answers: 4/6 conversations, \d+ answer tokens, [\d.]+ conversations/s, "
        r"\d+ tokens/s, ETA \d\d:\d\d",
        lines[0],
    ), lines
    assert re.fullmatch(r"slice 0/1 answers: 6/6 conversations, .* ETA 00:00", lines[-2])
    assert re.fullmatch(
        rf"slice 0/1 answers: done, 6/6 conversations \(6 answered, {report.regenerated_tokens} answer "
        r"tokens, \d+ tokens/s\) in \d\d:\d\d; 4 read back from earlier runs",
        lines[-1],
    ), lines[-1]
    slice0 = (("slice", "0"),)
    answered = [got[("specops_generate_regenerated_total", slice0)] for got in scrapes]
    assert answered == [0, 4]  # scraped before each window is stored
    # the answering stage is served too, so a long answering phase is not a capture stuck at 0
    assert [got[("specops_generate_answers_done", slice0)] for got in scrapes] == [0, 4]
    assert {got[("specops_generate_answers_expected", slice0)] for got in scrapes} == {6}
    assert ("specops_generate_answers_eta_seconds", slice0) not in scrapes[0], "no rate before one window"
    assert scrapes[1][("specops_generate_answers_eta_seconds", slice0)] >= 0
    assert all(got[("specops_generate_examples_processed", slice0)] == 0 for got in scrapes)
    assert scrapes[-1][("specops_generate_regenerated_tokens_total", slice0)] > 0
