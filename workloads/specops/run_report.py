"""The files a local run ends with: `report.json` (rounded, with provenance) and `report.png`.

The figure is a 2x2 grid a person can read at a glance (1600x900 pixels): the draft's loss and its
acceptance proxy over training (train and validation), the acceptance per draft position measured
by speculative decoding on held-out prompts (trained and untrained drafts side by side, with the
counts behind each bar), and the validation accuracy per draft position over training. The title
carries the acceptance lengths, the estimated speedup and the sample sizes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SIGNIFICANT_DIGITS = 4
"""report.json's floats keep this many significant digits: more than the evaluation's sample
sizes can support, few enough to read."""
FIGURE_INCHES = (16.0, 9.0)
FIGURE_DPI = 100
"""report.png is FIGURE_INCHES x FIGURE_DPI = 1600x900 pixels."""
TRAIN_COLOR, VALIDATION_COLOR = "tab:blue", "tab:orange"
TRAINED_COLOR, UNTRAINED_COLOR = "tab:green", "tab:gray"


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`value` with every float (in dicts and lists too) cut to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The trainer's metrics.jsonl records (none when training wrote no file)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(out_dir: Path, report: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    """report.json, then report.png (skipped with a warning where matplotlib is missing)."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        figure = report_figure(report, metrics)
    except ImportError:
        log.warning("matplotlib is not installed: no report.png")
        return
    figure.savefig(out_dir / "report.png", dpi=FIGURE_DPI)
    import matplotlib.pyplot as plt

    plt.close(figure)


def report_figure(report: dict[str, Any], metrics: list[dict[str, Any]]) -> Figure:
    """The report's 2x2 figure (not saved: the caller decides where)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 13, "axes.titlesize": 14, "axes.titleweight": "bold"}):
        figure, axes = plt.subplots(2, 2, figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
        train = [m for m in metrics if m.get("kind") == "train"]
        validation = [m for m in metrics if m.get("kind") == "eval"]
        _curves(axes[0, 0], train, validation, "loss", "Draft loss (TTT steps weighted)", "loss")
        _best_marker(axes[0, 0], validation)
        _curves(
            axes[0, 1],
            train,
            validation,
            "accept_proxy",
            "Acceptance proxy: 1 + sum of teacher-forced chain accuracy",
            "tokens per verifier step",
        )
        _position_bars(axes[1, 0], report)
        _position_accuracy(axes[1, 1], validation or train, "validation" if validation else "train")
        figure.suptitle(_title(report), fontsize=17, fontweight="bold")
        figure.text(0.5, 0.925, _subtitle(report), ha="center", fontsize=12, color="0.25")
        figure.tight_layout(rect=(0, 0, 1, 0.92), h_pad=2.5, w_pad=3)
    return figure


def _title(report: dict[str, Any]) -> str:
    name = str(report.get("name", "run"))
    if "acceptance_length" not in report:
        return f"{name}: trained, not evaluated"
    speedup = report.get("estimated_speedup") or {}
    text = (
        f"{name}: acceptance length {report['acceptance_length']:.2f} trained vs "
        f"{report['baseline_acceptance_length']:.2f} untrained"
    )
    if "value" in speedup:
        text += f"  ·  estimated speedup {speedup['value']:.2f}x"
    return text


def _subtitle(report: dict[str, Any]) -> str:
    """Sample sizes and setting: what the numbers in the title rest on."""
    parts: list[str] = []
    source = report.get("evaluation_prompts")
    trained = (report.get("evaluation") or {}).get("trained")
    if source and trained:
        held = source.get("held_out_conversations")
        stored = source.get("stored_conversations")
        of = f" (of {held} held out / {stored} stored)" if held is not None and stored is not None else ""
        parts.append(
            f"{source['prompts']} held-out prompts from {source['conversations']} conversations{of}, "
            f"none trained on"
        )
        parts.append(f"{trained['drafts']} draft steps, k = {trained['speculative_tokens']}")
    speedup = report.get("estimated_speedup") or {}
    if "draft_cost_ratio" in speedup:
        parts.append(f"draft step = {speedup['draft_cost_ratio']:.3f} verifier steps")
    training = report.get("training") or {}
    if training.get("step"):
        parts.append(f"{training['step']} training steps")
    return "  ·  ".join(parts)


def _curves(
    axes: Axes,
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    key: str,
    title: str,
    ylabel: str,
) -> None:
    for records, label, color, style in (
        (train, "train", TRAIN_COLOR, {"linewidth": 1.8}),
        (validation, "validation", VALIDATION_COLOR, {"linewidth": 2.2, "marker": "o", "markersize": 7}),
    ):
        points = [(m["step"], m[key]) for m in records if key in m]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, label=label, color=color, **style)
    axes.set(title=title, xlabel="training step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.margins(x=0.04, y=0.08)
    if axes.lines:
        axes.legend()
    else:
        _empty(axes, "no training metrics (metrics.jsonl)")


def _best_marker(axes: Axes, validation: list[dict[str, Any]]) -> None:
    """A star on the validation point the best checkpoint was saved at."""
    best = [m for m in validation if m.get("best") and "loss" in m]
    if best:
        chosen = min(best, key=lambda m: m["loss"])
        axes.plot(
            chosen["step"], chosen["loss"], marker="*", markersize=18, color="gold",
            markeredgecolor="black", linestyle="none", label=f"best (step {chosen['step']})", clip_on=False,
        )  # fmt: skip
        axes.legend()


def _position_bars(axes: Axes, report: dict[str, Any]) -> None:
    """Per-position acceptance as grouped bars, each labelled `accepted/drafts` (a 0 bar too)."""
    evaluation = report.get("evaluation") or {}
    axes.set(title="Acceptance per draft position (speculative decoding, held-out prompts)")
    if not evaluation:
        _empty(axes, "not evaluated")
        return
    labels = [label for label in ("trained", "untrained") if label in evaluation]
    width = 0.8 / len(labels)
    positions, highest = 0, 0.0
    for index, label in enumerate(labels):
        result = evaluation[label]
        shares = result["per_position"]
        counts = result.get("accepted_per_position") or [round(s * result["drafts"]) for s in shares]
        positions, highest = len(shares), max(highest, *shares)
        xs = [p + 1 + (index - (len(labels) - 1) / 2) * width for p in range(positions)]
        color = TRAINED_COLOR if label == "trained" else UNTRAINED_COLOR
        bars = axes.bar(
            xs, shares, width=width * 0.95, color=color, edgecolor="black", linewidth=0.8,
            label=f"{label} (acceptance length {result['acceptance_length']:.2f})",
        )  # fmt: skip
        axes.bar_label(bars, labels=[f"{c}/{result['drafts']}" for c in counts], padding=3, fontsize=11)
    axes.set_xticks(range(1, positions + 1))
    axes.set_xlim(0.4, positions + 0.6)
    axes.set_ylim(0, min(1.1, max(0.1, highest * 1.25)))  # room above the tallest bar for its label
    axes.set(xlabel="draft position (token j accepted with all before it)", ylabel="share of draft steps")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right")


def _position_accuracy(axes: Axes, records: list[dict[str, Any]], kind: str) -> None:
    """Teacher-forced chain accuracy of each draft position over training (full_acc_j)."""
    keys = sorted(
        (k for k in (records[-1] if records else {}) if k.startswith("full_acc_")),
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    axes.set(
        title=f"{kind.capitalize()} accuracy per draft position (teacher-forced chain)",
        xlabel="training step",
        ylabel="share of tokens",
    )
    if not keys:
        _empty(axes, "no per-position metrics")
        return
    for key in keys:
        points = [(m["step"], m[key]) for m in records if key in m]
        steps, values = zip(*points, strict=True)
        marker = "o" if kind == "validation" else None
        axes.plot(
            steps, values, marker=marker, linewidth=2, label=f"position {int(key.rsplit('_', 1)[1]) + 1}"
        )
    axes.margins(x=0.04)
    top = max(axes.get_ylim()[1], 0.01)
    axes.set_ylim(-0.03 * top, top)  # a position stuck at 0 stays visible above the x axis
    axes.grid(alpha=0.3)
    axes.legend()


def _empty(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="0.4")
