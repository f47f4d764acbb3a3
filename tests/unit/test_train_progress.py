"""A running trainer serves its progress as Prometheus metrics; the chart's dashboard draws only those."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _train_support import build_verifier, make_examples, train_config, write_store

from specops.testing.net import free_port
from specops.train.progress import METRIC_NAMES
from specops.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "specops" / "dashboards" / "specops-training.json"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 6-step run with validation every 3 steps, scraped from inside it at step 3 and at the end."""
    root = tmp_path_factory.mktemp("progress")
    verifier = build_verifier(root / "verifier")
    write_store(root / "data", root / "verifier", make_examples(verifier, 40))
    port = free_port()
    cfg = train_config(
        root,
        root / "verifier",
        root / "data",
        "run",
        max_steps=6,
        eval_every=3,
        data__validation_fraction=0.25,
        metrics__port=port,
    )
    scrapes: dict[int, Any] = {}

    def hook(record: dict[str, Any]) -> None:
        if record["kind"] == "eval":  # after the step's train record and its evaluation
            scrapes[record["step"]] = _scrape(port)

    train(cfg, on_log=hook)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"port": port, "scrapes": scrapes, "records": records}


def test_a_running_trainer_serves_the_figures_it_logs(scraped: dict[str, Any]) -> None:
    rank = (("rank", "0"),)
    for step in (3, 6):
        got = scraped["scrapes"][step]
        train_rec = next(r for r in scraped["records"] if r["kind"] == "train" and r["step"] == step)
        eval_rec = next(r for r in scraped["records"] if r["kind"] == "eval" and r["step"] == step)
        assert got[("specops_train_step", rank)] == step
        assert got[("specops_train_total_steps", rank)] == 6
        assert got[("specops_train_loss", rank)] == pytest.approx(train_rec["loss"])
        assert got[("specops_train_learning_rate", rank)] == pytest.approx(train_rec["lr"])
        assert got[("specops_train_tokens_per_second", rank)] == pytest.approx(train_rec["tokens_per_s"])
        for ttt in ("0", "1"):
            labels = (("rank", "0"), ("ttt_step", ttt))
            assert got[("specops_train_ttt_loss", labels)] == pytest.approx(train_rec[f"loss_{ttt}"])
            assert got[("specops_train_ttt_accuracy", labels)] == pytest.approx(train_rec[f"full_acc_{ttt}"])
        assert got[("specops_train_validation_loss", rank)] == pytest.approx(eval_rec["loss"])
    assert scraped["scrapes"][3][("specops_train_eta_seconds", rank)] > 0
    assert scraped["scrapes"][6][("specops_train_eta_seconds", rank)] == 0
    best = min(r["loss"] for r in scraped["records"] if r["kind"] == "eval")
    assert scraped["scrapes"][6][("specops_train_best_validation_loss", rank)] == pytest.approx(best)
    served = {name for name, _ in scraped["scrapes"][6]}
    assert served == set(METRIC_NAMES), "METRIC_NAMES lists exactly what a trainer serves"
    with pytest.raises(urllib.error.URLError):  # the endpoint ends with the run
        _scrape(scraped["port"])


def test_every_metric_the_dashboard_draws_is_served(scraped: dict[str, Any]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    drawn = {name for expr in exprs for name in re.findall(r"\bspecops_train_\w+", expr)}
    served = {name for name, _ in scraped["scrapes"][6]}
    assert drawn and drawn <= served, sorted(drawn - served)
    assert {"specops_train_step", "specops_train_loss", "specops_train_eta_seconds"} <= drawn
