"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and Trackio, through accelerate's tracker
classes rather than hand-written clients.

Rank 0 only. Where each tool writes and who it authenticates as come from the tool's own
environment (in pods, from Secrets through `pod.envFrom`): `WANDB_API_KEY`, `WANDB_MODE`,
`WANDB_PROJECT`; `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`; `TRACKIO_DIR`, `HF_TOKEN`. Without
them everything stays on the run's volume: TensorBoard events in `tensorboard/`, W&B runs in
`wandb/`, an MLflow file store in `mlruns/`, Trackio's database in `trackio/`. A resumed run
continues the same tracker runs (their ids are kept in `tracking.json`) and logs its config once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specops.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
"""`train.reportTo` value -> the module its tracker imports."""
PROJECT = "specops"
"""W&B project / MLflow experiment / Trackio project unless the tool's environment names another."""
STATE_FILE = "tracking.json"


def check_installed(report_to: Sequence[str]) -> None:
    """Refuse, before any work, a tracker whose package is missing (not a warning at the first log)."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            f"train.reportTo: {', '.join(missing)} needs the "
            f"{', '.join('`' + PACKAGES[m] + '`' for m in missing)} package "
            "(install the `tracking` extra: pip install 'specops[tracking]')"
        )


class Trackers:
    """The trackers a run reports to; `log` and `finish` fan out to each."""

    def __init__(
        self,
        report_to: Sequence[str],
        output_dir: Path,
        *,
        run_name: str,
        tags: Sequence[str],
        config: Mapping[str, Any],
    ) -> None:
        check_installed(report_to)
        state_path = output_dir / STATE_FILE
        resumed = state_path.exists()
        state: dict[str, str] = json.loads(state_path.read_text()) if resumed else {}
        self._trackers = [_start(name, output_dir, run_name, list(tags), state) for name in report_to]
        if not resumed:  # a resumed run continues a run that has its config (MLflow refuses a second)
            params = flatten(config)
            for tracker in self._trackers:
                tracker.store_init_configuration(params)
        state.update(_run_ids(self._trackers))
        state_path.write_text(json.dumps(state, sort_keys=True) + "\n")

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        numbers = {
            f"{kind}/{key}": value
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        for tracker in self._trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self._trackers:
            tracker.finish()


def _start(name: str, output_dir: Path, run_name: str, tags: list[str], state: dict[str, str]) -> Any:
    from accelerate import tracking

    tracker: Any
    if name == "tensorboard":
        # accelerate puts the events in logging_dir/run_name.
        tracker = tracking.TensorBoardTracker(run_name, output_dir / "tensorboard")
    elif name == "wandb":
        run_id = state.get("wandb") or _stable_id(output_dir, run_name)
        tracker = tracking.WandBTracker(
            os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            tags=tags,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
        )
    elif name == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # A file store on the run's volume: needs no database driver; MLflow 3 keeps it in
            # maintenance mode and wants that said.
            os.environ["MLFLOW_TRACKING_URI"] = (output_dir / "mlruns").resolve().as_uri()
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        tracker = tracking.MLflowTracker(
            experiment_name=PROJECT,
            run_id=state.get("mlflow"),
            run_name=run_name,
            tags=dict.fromkeys(tags, "true"),
        )
    else:
        os.environ.setdefault("TRACKIO_DIR", str((output_dir / "trackio").resolve()))
        tracker = tracking.TrackioTracker(
            os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name, resume="allow"
        )
    try:
        tracker.start()
    except Exception as exc:  # credentials, a tracking server: the tool's own message says which
        raise ConfigError(f"train.reportTo: {name} could not start a run: {exc}") from exc
    return tracker


def _run_ids(trackers: Sequence[Any]) -> dict[str, str]:
    """The ids a resumed run needs to continue the same tracker runs."""
    ids: dict[str, str] = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    return ids


def _stable_id(output_dir: Path, run_name: str) -> str:
    return hashlib.sha256(f"{output_dir.resolve()}:{run_name}".encode()).hexdigest()[:16]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """`{"optim": {"lr": 1e-4}}` -> `{"optim.lr": 1e-4}`: every tracker takes flat scalar params."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, str | int | float | bool):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat
