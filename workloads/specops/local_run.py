"""`specops run FILE`: the SpeculatorTraining a cluster would run, as local processes.

The YAML is validated with the operator's own CR models and rendered into the same DataGenConfig and
TrainConfig the pods would read (`specops_operator.builders` render functions); only the paths change
to an output directory here. Stages: generate (DiskStore under `data/`) -> train (in process, or
torchrun for several ranks) -> evaluate the trained draft and an untrained one on the conversations
the training's split held out (`specops.data.split`: the same split its validation used) ->
report (`report.json` with provenance, `report.png`: `specops.run_report`; the `vllm serve`
command) -> with `spec.export`, the upload (`specops.publish`, credentials from this environment:
HF_TOKEN, AWS_*). Every stage resumes: a rerun skips stored examples and continues from the newest
checkpoint. `logs/run.log` holds every stage's lines: generation, the trainer's, evaluation progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import specops
from specops import provenance
from specops.config import (
    ConfigError,
    DataGenConfig,
    EngineConfig,
    ExportConfig,
    ProgressMetricsConfig,
    TrainConfig,
    dump_config,
)
from specops.run_report import read_metrics, rounded, write_report
from specops.serving import vllm_serve_command, vllm_serve_short
from specops.train.monitor import LINES, METRICS_FILE, STDERR_TO_STDOUT
from specops.verifier import resolve_verifier, verifier_reference

if TYPE_CHECKING:
    from specops.evaluate import EvalReport, PromptSet
    from specops.models.eagle3 import Eagle3DraftModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalPlan:
    """Everything a local run needs, derived from one SpeculatorTraining (+ its data generation)."""

    name: str
    out_dir: Path
    datagen: DataGenConfig
    train: TrainConfig
    nproc: int
    evaluate: bool
    max_prompts: int
    max_new_tokens: int
    online: bool
    export: ExportConfig | None = None
    """Where to upload the trained draft (the CR's `spec.export`); None: nowhere."""


LOCAL_METRICS = ProgressMetricsConfig(port=0)
"""Live metrics of a local run's processes on loopback ports the OS picks (each logs its own): the
pods' fixed port 9400 would collide between two runs, or a run and a test, on one machine."""


def plan_local(path: Path, out_dir: Path | None = None, nproc: int | None = None) -> LocalPlan:
    """Validate `path` like the operator does and render local configs; errors name the field."""
    from specops_operator.api import SpeculatorDataGen, SpeculatorTraining, load_resources
    from specops_operator.builders.datagen import DataGenNames
    from specops_operator.builders.datagen import render_config as render_datagen
    from specops_operator.builders.training import DataSource
    from specops_operator.builders.training import render_config as render_train

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    resources = load_resources(text, str(path))
    trainings = [r for r in resources if isinstance(r, SpeculatorTraining)]
    if len(trainings) != 1:
        raise ConfigError(f"{path}: expected exactly one SpeculatorTraining, found {len(trainings)}")
    training = trainings[0]
    spec = training.spec
    if spec.data_gen is not None:
        datagen_spec, datagen_name = spec.data_gen, f"{training.metadata.name}-data"
    else:
        assert spec.data_gen_ref is not None  # the CR rules require one of the two
        refs = [
            r
            for r in resources
            if isinstance(r, SpeculatorDataGen) and r.metadata.name == spec.data_gen_ref.name
        ]
        if not refs:
            raise ConfigError(
                f"{path}: spec.dataGenRef.name: no SpeculatorDataGen {spec.data_gen_ref.name!r} in this file "
                "(a local run needs it in the same file, or use an inline spec.dataGen)"
            )
        datagen_spec, datagen_name = refs[0].spec, refs[0].metadata.name

    out = (out_dir or Path("runs") / training.metadata.name).resolve()
    roots = [str(out), *map(str, _default_roots())]
    names = DataGenNames(datagen_name, "local")
    pod_datagen = render_datagen(datagen_spec, names)
    datagen = pod_datagen.model_copy(
        update={
            "engine": local_engine(pod_datagen.engine, "kind" in datagen_spec.engine.model_fields_set),
            "sync": pod_datagen.sync.model_copy(
                update={"kind": "disk", "path": str(out / "data"), "curve_key_dir": None}
            ),
            "run": pod_datagen.run.model_copy(
                update={
                    "num_workers": datagen_spec.workers,
                    "num_shards": 1,
                    "shard_index": 0,
                    "allowed_roots": roots,
                }
            ),
            "metrics": LOCAL_METRICS,
        }
    )
    # A local run always stores the data, then trains on it (the online mode streams on clusters).
    offline_source = DataSource(names, datagen_spec.model_copy(update={"mode": "offline"}))
    pod_train = render_train(spec, offline_source)
    train = pod_train.model_copy(
        update={
            "data": pod_train.data.model_copy(update={"kind": "disk", "path": str(out / "data")}),
            "output_dir": str(out / "train"),
            "allowed_roots": roots,
            "device": "auto",
            "metrics": LOCAL_METRICS,
        }
    )
    return LocalPlan(
        name=training.metadata.name,
        out_dir=out,
        datagen=datagen,
        train=train,
        nproc=nproc or spec.procs_per_node or 1,
        evaluate=spec.evaluation.enabled,
        max_prompts=spec.evaluation.max_prompts,
        max_new_tokens=spec.evaluation.max_new_tokens,
        online=datagen_spec.mode == "online",
        export=spec.export,
    )


def local_engine(engine: EngineConfig, kind_given: bool) -> EngineConfig:
    """The YAML's engine when it names one; otherwise vLLM where it is installed and a GPU is
    present, else Transformers. On CPU a Transformers forward wins a small job: vLLM's CPU start
    alone takes about 30 s, longer than the demo's whole generation stage."""
    if kind_given:
        return engine
    import torch

    from specops.engines.vllm import vllm_available

    if vllm_available() and torch.cuda.is_available():
        return engine.model_copy(update={"kind": "vllm"})
    return engine.model_copy(update={"kind": "transformers"})


def _default_roots() -> list[Path]:
    from specops.paths import default_roots

    return default_roots()


# --------------------------------------------------------------------------- stages


def run_local(plan: LocalPlan) -> dict[str, Any]:
    """Run every stage, write the report, return it. Raises on a failed stage."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with _logging(plan.out_dir / "logs" / "run.log"):
        return _run_stages(plan)


def resolved_configs(plan: LocalPlan) -> dict[str, str]:
    """The configs the stages read, as written into the output directory (file name -> YAML)."""
    return {"datagen.yaml": dump_config(plan.datagen), "train.yaml": dump_config(plan.train)}


def _run_stages(plan: LocalPlan) -> dict[str, Any]:
    for name, text in resolved_configs(plan).items():
        (plan.out_dir / name).write_text(text)
    if plan.online:
        log.info("dataGen.mode is online: a local run stores the data first, then trains on it")

    started = time.perf_counter()
    _banner(f"[1/3] generating data into {plan.out_dir / 'data'}")
    generation = _generate(plan)
    _banner(f"[2/3] training {plan.train.draft.algorithm} draft into {plan.out_dir / 'train'}")
    training = _train(plan)
    speculator = training["best"] or training["final"]
    if not speculator:
        raise RuntimeError(f"training produced no speculator (see {plan.out_dir / 'logs'})")
    evaluation: dict[str, Any] = {}
    cost_ratio: float | None = None
    if plan.evaluate and plan.train.data.validation_fraction <= 0:
        log.warning("evaluation skipped: data.validationFraction is 0, so no conversation was held out")
    elif plan.evaluate:
        _banner("[3/3] evaluating trained vs untrained draft on held-out conversations")
        evaluation, cost_ratio = _evaluate(plan, Path(speculator))
    seconds = time.perf_counter() - started
    metrics = read_metrics(plan.out_dir / "train" / METRICS_FILE)
    report = _report(plan, generation, training, evaluation, cost_ratio, metrics, Path(speculator), seconds)
    write_report(plan.out_dir, report, metrics)
    log.info("report: %s, %s", plan.out_dir / "report.json", plan.out_dir / "report.png")
    if plan.export is not None:
        published = export_speculator(plan.export, Path(speculator), report)
        if published is not None:
            report["published"] = published
            write_report(plan.out_dir, report, metrics)
    return report


def export_speculator(
    target: ExportConfig, speculator: Path, report: dict[str, Any]
) -> dict[str, Any] | None:
    """`spec.export` of a local run: the upload the operator's upload pod makes, after the same
    evaluation gate (a draft that is not lossless, or not better than an untrained one, stays
    here). The CR's Secret references are for clusters; here HF_TOKEN and AWS_* come from the
    environment."""
    from dataclasses import asdict

    from specops.publish import publish

    if report.get("evaluation") and not (report["better_than_baseline"] and report["lossless"]):
        log.warning("not uploaded: the trained draft did not pass its evaluation (see report.json)")
        return None
    where = target.hub.repo if target.hub is not None else target.uri
    _banner(f"uploading {speculator} to {where} (credentials from this environment)")
    published = asdict(publish(speculator, target, (report.get("evaluation") or {}).get("trained")))
    log.info("uploaded to %s", published["url"])
    return published


def _banner(text: str) -> None:
    print(f"\n== {text}", file=sys.stderr, flush=True)
    log.info("%s", text, extra={PRINTED: True})


CONSOLE_LOGGERS = ("specops.local_run", "specops.evaluate")
"""Loggers whose INFO lines a run also shows on stderr (its own and evaluation progress); the
other stages show their own bars and lines, and warnings from anywhere are shown."""
PRINTED = "specops_printed"
"""A log record's attribute: its line is on the console already (it goes to run.log only)."""


def _on_console(record: logging.LogRecord) -> bool:
    if getattr(record, PRINTED, False):
        return False
    return record.levelno >= logging.WARNING or record.name in CONSOLE_LOGGERS


@contextlib.contextmanager
def _logging(path: Path) -> Iterator[None]:
    """Everything logged (the trainer's lines included) into `path`, the run's lines and every
    warning on stderr too; the handlers go when the run ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_on_console)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    for logger, handler in ((root, to_file), (root, console), (LINES, to_file)):
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, handler in ((root, to_file), (root, console), (LINES, to_file)):
            logger.removeHandler(handler)
        to_file.close()
        root.setLevel(level)


def _generate(plan: LocalPlan) -> dict[str, Any]:
    from specops.generate import generate_data

    report = generate_data(plan.datagen)
    if not report.ok:
        raise RuntimeError(f"data generation failed: {report.to_json()} (see {plan.out_dir / 'logs'})")
    return report.to_json()


def _train(plan: LocalPlan) -> dict[str, Any]:
    if plan.nproc > 1:
        return _train_torchrun(plan)
    from specops.train.trainer import train

    result = train(plan.train)
    if result.interrupted:
        raise KeyboardInterrupt
    return {
        "step": result.step,
        "final": str(result.final) if result.final else None,
        "best": str(result.best) if result.best else None,
        "best_val_loss": result.best_val_loss,
    }


def _train_torchrun(plan: LocalPlan) -> dict[str, Any]:
    """Several local ranks (gloo on CPU): the same `specops train` a trainer pod runs."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.nproc}",
        "-m", "specops.cli", "train", "--config", str(plan.out_dir / "train.yaml"),
    ]  # fmt: skip
    # Rank 0 writes its stderr into its stdout (its log records too); the other ranks' stderr
    # (their warnings and errors) and torchrun's own stay on the console.
    env = {**os.environ, "OMP_NUM_THREADS": "1", STDERR_TO_STDOUT: "1"}
    code, lines = stream_lines(command, env)
    if code != 0:
        raise RuntimeError(f"training failed with exit code {code} (see {plan.out_dir / 'logs'})")
    return dict(json.loads(next(line for line in reversed(lines) if line.startswith("{"))))


def stream_lines(command: Sequence[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `command`; each stdout line (rank 0's: its training lines, its log records, its JSON
    result) goes on to the console and, through `LINES`, into run.log as it comes. Returns the exit
    code and the lines."""
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            if line.strip():
                LINES.info(line.rstrip("\n"))
                lines.append(line.strip())
    return process.returncode, lines


def _evaluate(plan: LocalPlan, speculator: Path) -> tuple[dict[str, Any], float]:
    """Acceptance of the trained draft and of an untrained twin on the same held-out prompts, and
    the draft's cost in verifier steps (`specops.evaluate.draft_cost_ratio`)."""
    import torch

    from specops.evaluate import draft_cost_ratio, evaluate, greedy_references
    from specops.models.eagle3 import Eagle3DraftModel
    from specops.verifier import load_model, resolve_device

    roots = plan.train.allowed_roots
    found = held_out_prompts(plan)
    prompts = found.prompts
    if not prompts:
        raise RuntimeError(
            "evaluation: no held-out prompts (raise data.validationFraction or the dataset size)"
        )
    split = found.source["split"]
    log.info(
        "evaluation: %d prompts from %d held-out conversations (split by %s: fraction %g, seed %d)",
        len(prompts),
        found.source["conversations"],
        split["by"],
        split["fraction"],
        split["seed"],
    )
    device = resolve_device("auto")
    verifier = load_model(plan.train.verifier, dtype=torch.float32, device=device, allowed_roots=roots)
    trained = Eagle3DraftModel.from_pretrained(speculator, device=device)
    untrained = untrained_twin(trained).to(device)
    references = greedy_references(verifier, prompts, plan.max_new_tokens)
    reports: dict[str, EvalReport] = {}
    for label, draft in (("trained", trained), ("untrained", untrained)):
        reports[label] = evaluate(
            verifier,
            draft,
            prompts,
            max_new_tokens=plan.max_new_tokens,
            references=references,
            label=f"{label} draft",
        )
        reports[label].source = found.source
        log.info("%s draft: acceptance length %.3f", label, reports[label].acceptance_length)
    return {label: r.to_dict() for label, r in reports.items()}, draft_cost_ratio(verifier, trained)


def held_out_prompts(plan: LocalPlan) -> PromptSet:
    """Prompts of the conversations the training's split kept out of training (`train.yaml`'s
    data.validationFraction and seed), at most `spec.evaluation.maxPrompts`."""
    from specops.data.split import HeldOutSplit
    from specops.evaluate import load_prompts

    split = HeldOutSplit(plan.train.data.validation_fraction, plan.train.seed)
    return load_prompts(
        plan.train.data.path or "",
        allowed_roots=plan.train.allowed_roots,
        limit=plan.max_prompts,
        field="data.path",
        split=split,
    )


def untrained_twin(trained: Eagle3DraftModel) -> Eagle3DraftModel:
    """Same config, same frozen verifier parts and vocab mapping; trainable weights freshly initialized."""
    import torch

    torch.manual_seed(0)
    twin = type(trained)(trained.config)
    trainable = {name for name, p in twin.named_parameters() if p.requires_grad}
    kept = {k: v for k, v in trained.state_dict().items() if k not in trainable}
    twin.load_state_dict({**twin.state_dict(), **kept})
    return twin.eval()


# --------------------------------------------------------------------------- report


def _report(
    plan: LocalPlan,
    generation: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
    cost_ratio: float | None,
    metrics: list[dict[str, Any]],
    speculator: Path,
    seconds: float,
) -> dict[str, Any]:
    """report.json's content, floats rounded (`specops.run_report.rounded`); `metrics` are the
    trainer's metrics.jsonl records, read once for the report and its figure."""
    from specops.evaluate import estimated_speedup

    train_records = [m for m in metrics if m.get("kind") == "train"]
    k = plan.train.draft.speculative_tokens
    verifier_dir = resolve_verifier(plan.train.verifier, plan.train.allowed_roots)
    report: dict[str, Any] = {
        "name": plan.name,
        "output_dir": str(plan.out_dir),
        "speculator": str(speculator),
        "seconds": seconds,
        "provenance": run_provenance(plan, verifier_dir),
        "data": {"engine": plan.datagen.engine.kind, **generation},
        "training": {
            **training,
            "tokens_per_s": _mean([m["tokens_per_s"] for m in train_records if "tokens_per_s" in m]),
            "final_loss": train_records[-1].get("loss") if train_records else None,
        },
        "evaluation": evaluation,
        "serve": {
            "short": vllm_serve_short(str(speculator)),
            "long": vllm_serve_command(
                verifier_reference(plan.train.verifier, verifier_dir), str(speculator), k
            ),
        },
    }
    if evaluation:
        trained, untrained = evaluation["trained"], evaluation["untrained"]
        report["acceptance_length"] = trained["acceptance_length"]
        report["baseline_acceptance_length"] = untrained["acceptance_length"]
        report["better_than_baseline"] = trained["acceptance_length"] > untrained["acceptance_length"]
        report["lossless"] = trained["lossless"] and untrained["lossless"]
        report["evaluation_prompts"] = {**trained["source"], **split_counts(plan)}
    if evaluation and cost_ratio is not None:
        report["estimated_speedup"] = {
            "value": estimated_speedup(trained["acceptance_length"], k, cost_ratio),
            "baseline": estimated_speedup(untrained["acceptance_length"], k, cost_ratio),
            "draft_cost_ratio": cost_ratio,
            "formula": "acceptance_length / (1 + k * draft_cost_ratio); draft_cost_ratio = weights a "
            "draft step reads / weights a verifier step reads (memory-bound decoding); an estimate, "
            "not a measurement",
        }
    return dict(rounded(report))


def run_provenance(plan: LocalPlan, verifier_dir: str) -> dict[str, Any]:
    """What produced this run: versions, the git revision of the SpecOps code (when it runs from a
    checkout), the resolved configs' digest (`cat datagen.yaml train.yaml | sha256sum`), the
    verifier that ran and the digest of the stored data's manifest."""
    return {
        "versions": provenance.versions(),
        "git": provenance.git_revision(Path(specops.__file__).parent),
        "config_sha256": provenance.texts_sha256(list(resolved_configs(plan).values())),
        "verifier": provenance.verifier_provenance(plan.train.verifier, verifier_dir),
        "data": data_provenance(Path(plan.train.data.path or "")),
    }


def data_provenance(data_dir: Path) -> dict[str, Any]:
    """The stored data's manifest (the merged one, else each writer's) and its sha256."""
    merged = data_dir / "manifest.json"
    manifests = [merged] if merged.is_file() else sorted(data_dir.glob("manifest-w*.json"))
    return {
        "path": str(data_dir),
        "manifests": [m.name for m in manifests],
        "manifest_sha256": provenance.files_sha256(manifests) if manifests else None,
    }


def split_counts(plan: LocalPlan) -> dict[str, int]:
    """How many conversations the store holds and how many of them the training's split held out
    (the evaluation's prompts come from the latter, at most `maxPrompts` of them)."""
    from specops.data.split import HeldOutSplit, conversation_id
    from specops.stores.disk import DiskStore

    split = HeldOutSplit(plan.train.data.validation_fraction, plan.train.seed)
    store = DiskStore.open(plan.train.data.path or "", plan.train.allowed_roots, field="data.path")
    held_out = {conversation_id(i): split.held_out(i) for part in store.partitions() for i in store.ids(part)}
    return {"stored_conversations": len(held_out), "held_out_conversations": sum(held_out.values())}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary(report: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    lines = [f"output:      {report['output_dir']}", f"speculator:  {report['speculator']}"]
    data = report["data"]
    lines.append(
        f"data:        {data['written']} examples generated ({data['tokens_per_s']:.0f} tokens/s), "
        f"{data['skipped']} already stored"
    )
    if "acceptance_length" in report:
        lines.append(
            f"acceptance:  {report['acceptance_length']:.3f} trained vs {report['baseline_acceptance_length']:.3f} "
            f"untrained (lossless: {report['lossless']})"
        )
        source = report["evaluation_prompts"]
        lines.append(
            f"prompts:     {source['prompts']} from {source['conversations']} conversations held out of "
            f"training ({source['split']['fraction']:g} of the conversations, seed {source['split']['seed']})"
        )
    lines += [f"serve:       {report['serve']['long']}", f"time:        {report['seconds']:.0f} s"]
    return "\n".join(lines)
