"""Every plot of a run, drawn here (the report task's side), never in ``methods/``.

Three rules make the plots of one run readable side by side, each a small function of its own:
a method has one colour in every plot (:func:`method_colour`), a latency axis is logarithmic when
what it shows spans more than 10x (:func:`log_scale_needed`), and a correlation coefficient is
printed only over at least 5 points (:func:`correlation_title`). Labels are never clipped: figures use
constrained layout and are saved with ``bbox_inches="tight"``.

matplotlib is imported inside each function: a run whose plots are all cached never imports it.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from podium.methods.pareto import pareto_front
from podium.methods.profiling import DeviceProfile
from podium.methods.scaling import METRICS, runtime_correlation

# Fixed, so that a method looks the same in the device plots, its own plots and every run's report.
# Red is kept for budgets, black for winners.
METHOD_COLOURS: dict[str, str] = {
    "anchor": "#595959",  # grey
    "stitching": "#1f77b4",  # blue
    "shrinking": "#2ca02c",  # green
    "scaling": "#ff7f0e",  # orange
    "self_distill": "#9467bd",  # purple
}
# A method not listed above gets one of these, chosen by its name alone (the same in every run).
SPARE_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939")
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "bf16": "P", "int8": "^"}
LOG_SCALE_RANGE = 10.0  # max/min above which a latency axis is drawn logarithmic
MIN_POINTS_FOR_R = 5  # below this a Pearson r says nothing a reader should trust


def method_colour(method: str) -> str:
    """The colour ``method`` has in every plot: fixed for the known methods, else derived from the name."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    digest = int(hashlib.sha256(method.encode()).hexdigest(), 16)
    return SPARE_COLOURS[digest % len(SPARE_COLOURS)]


def log_scale_needed(values: Iterable[float | None]) -> bool:
    """True when the positive, finite ``values`` span more than :data:`LOG_SCALE_RANGE` (max/min)."""
    shown = [float(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(shown) >= 2 and max(shown) / min(shown) > LOG_SCALE_RANGE


def correlation_title(metric: str, r: float, n: int) -> str:
    """A panel title with Pearson r only where it means something: at least :data:`MIN_POINTS_FOR_R`
    points and a defined value."""
    if n < MIN_POINTS_FOR_R:
        return f"{metric} (n={n}: too few points for r)"
    if math.isnan(r):
        return f"{metric}: r undefined (constant series)"
    return f"{metric}: r = {r:.3f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path | str, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def device_figure(device: DeviceProfile, rows: list[dict]) -> Any:
    """Accuracy against measured p50 latency (with the median's 95 % interval) of every candidate on
    ``device``, per method and precision; the Pareto front, the budget and the winner marked."""
    plt = _pyplot()

    measured = [r for r in rows if r["p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    for method in sorted({r["method"] for r in measured}):
        colour = method_colour(method)
        in_method = [r for r in measured if r["method"] == method]
        for precision in sorted({r.get("precision", "fp32") for r in in_method}, key=lambda p: (p != "fp32", p)):
            pts = [r for r in in_method if r.get("precision", "fp32") == precision]
            label = method if precision == "fp32" else f"{method} {precision}"
            ax.scatter([r["p50_ms"] for r in pts], [r["val_acc"] for r in pts], label=label, color=colour,
                       marker=PRECISION_MARKERS.get(precision, "D"), s=24)
            spans = [r for r in pts if r.get("p50_low_ms") is not None]  # the median's 95 % interval
            if spans:
                ax.errorbar([r["p50_ms"] for r in spans], [r["val_acc"] for r in spans], fmt="none",
                            xerr=[[r["p50_ms"] - r["p50_low_ms"] for r in spans],
                                  [r["p50_high_ms"] - r["p50_ms"] for r in spans]],
                            ecolor=colour, elinewidth=0.8, alpha=0.6)
    front = pareto_front(measured, cost=lambda r: r["p50_ms"], value=lambda r: r["val_acc"])
    if front:
        ax.plot([r["p50_ms"] for r in front], [r["val_acc"] for r in front], color="grey", lw=1, ls=":",
                label="Pareto front")
    ax.axvline(device.latency_budget_ms, color="red", ls="--", lw=1, label=f"budget {device.latency_budget_ms:g} ms")
    for r in measured:
        if r["winner"]:
            ax.scatter([r["p50_ms"]], [r["val_acc"]], marker="*", s=260, facecolors="none", edgecolors="black",
                       label=f"winner: {r['candidate']}")
    shown = [device.latency_budget_ms, *(r.get(k) for r in measured for k in ("p50_ms", "p50_low_ms", "p50_high_ms"))]
    if log_scale_needed(shown):
        ax.set_xscale("log")
    ax.set_xlabel(f"measured p50 latency (ms), {device.runtime}, {device.threads} thread(s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{device.name}: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside, not over points
    return fig


def plot_device(device: DeviceProfile, rows: list[dict], path: Path) -> Path:
    return _save(device_figure(device, rows), path, dpi=110)


def pareto_figure(rows: Sequence[dict[str, Any]], title: str = "SN-Net stitches", method: str = "stitching") -> Any:
    """Accuracy vs MFLOPs of every configuration of ``method``; anchors and the Pareto front highlighted."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120, constrained_layout=True)
    configurations = [r for r in rows if r.get("kind") != "anchor"]
    anchors = [r for r in rows if r.get("kind") == "anchor"]
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["flops"])
    ax.scatter([r["flops"] / 1e6 for r in configurations], [100 * r["val_acc"] for r in configurations], s=18,
               color=method_colour(method), label="stitches" if method == "stitching" else "configurations")
    ax.scatter([r["flops"] / 1e6 for r in anchors], [100 * r["val_acc"] for r in anchors], s=60, marker="*",
               color=method_colour("anchor"), label="anchors")
    if front:
        ax.plot([r["flops"] / 1e6 for r in front], [100 * r["val_acc"] for r in front], "k--", lw=1,
                label="Pareto front")
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path | str, title: str = "SN-Net stitches",
                method: str = "stitching") -> Path:
    return _save(pareto_figure(rows, title, method), path, dpi=120)


def runtime_correlation_figure(records: Sequence[dict[str, Any]], device_name: str) -> Any:
    """Three scatter panels, latency vs flops/params/acts of the scaling models, Pearson r in the
    titles where there are enough points (:func:`correlation_title`)."""
    plt = _pyplot()

    corr = runtime_correlation(records)
    latency = [float(r["p50_ms"]) for r in records]
    log_latency = log_scale_needed(latency)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, metric in zip(axes, METRICS):
        xs = [float(r[metric]) / 1e6 for r in records]
        ax.scatter(xs, latency, color=method_colour("scaling"))
        for x, y, r in zip(xs, latency, records):
            ax.annotate(str(r.get("name", "")), (x, y), fontsize=6, alpha=0.7)
        if log_latency:
            ax.set_yscale("log")
        ax.set_xlabel(f"{metric} (M)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(correlation_title(metric, corr[f"r_{metric}"], corr["n"]))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency vs complexity on {device_name} (n={corr['n']})")
    return fig


def plot_runtime_correlation(records: Sequence[dict[str, Any]], path: str | Path, device_name: str) -> Path:
    return _save(runtime_correlation_figure(records, device_name), path, dpi=100)
