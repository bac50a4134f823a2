"""Every plot of a run, drawn here (the report task's side), never in ``methods/``.

matplotlib is imported inside each function: a run whose plots are all cached never imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from podium.methods.pareto import pareto_front
from podium.methods.profiling import DeviceProfile
from podium.methods.scaling import METRICS, runtime_correlation


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_device(device: DeviceProfile, rows: list[dict], path: Path) -> Path:
    plt = _pyplot()

    measured = [r for r in rows if r["p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    for i, method in enumerate(sorted({r["method"] for r in measured})):
        for precision, marker in markers.items():
            pts = [r for r in measured if r["method"] == method and r.get("precision", "fp32") == precision]
            if pts:
                label = method if precision == "fp32" else f"{method} {precision}"
                ax.scatter([r["p50_ms"] for r in pts], [r["val_acc"] for r in pts], label=label, color=f"C{i}",
                           marker=marker, s=24)
                spans = [r for r in pts if r.get("p50_low_ms") is not None]  # the median's 95 % interval
                if spans:
                    ax.errorbar([r["p50_ms"] for r in spans], [r["val_acc"] for r in spans], fmt="none",
                                xerr=[[r["p50_ms"] - r["p50_low_ms"] for r in spans],
                                      [r["p50_high_ms"] - r["p50_ms"] for r in spans]],
                                ecolor=f"C{i}", elinewidth=0.8, alpha=0.6)
    front = pareto_front(measured, cost=lambda r: r["p50_ms"], value=lambda r: r["val_acc"])
    if front:
        ax.plot([r["p50_ms"] for r in front], [r["val_acc"] for r in front], color="grey", lw=1, ls=":",
                label="Pareto front")
    ax.axvline(device.latency_budget_ms, color="red", ls="--", lw=1, label=f"budget {device.latency_budget_ms} ms")
    for r in measured:
        if r["winner"]:
            ax.scatter([r["p50_ms"]], [r["val_acc"]], marker="*", s=260, facecolors="none", edgecolors="black",
                       label=f"winner: {r['candidate']}")
    ax.set_xlabel(f"measured p50 latency (ms), {device.runtime}, {device.threads} thread(s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{device.name}: accuracy vs latency")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path | str, title: str = "SN-Net stitches") -> Path:
    """Accuracy vs MFLOPs of every configuration; anchors and the Pareto front highlighted."""
    plt = _pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    stitches = [r for r in rows if r["kind"] == "stitch"]
    anchors = [r for r in rows if r["kind"] == "anchor"]
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["flops"])
    ax.scatter([r["flops"] / 1e6 for r in stitches], [100 * r["val_acc"] for r in stitches], s=18, label="stitches")
    ax.scatter([r["flops"] / 1e6 for r in anchors], [100 * r["val_acc"] for r in anchors], s=60, marker="*",
               color="red", label="anchors")
    if front:
        ax.plot([r["flops"] / 1e6 for r in front], [100 * r["val_acc"] for r in front], "k--", lw=1,
                label="Pareto front")
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_runtime_correlation(records: Sequence[dict[str, Any]], path: str | Path, device_name: str) -> Path:
    """Three scatter panels (latency vs flops/params/acts) with Pearson r in the titles, as a PNG."""
    plt = _pyplot()

    corr = runtime_correlation(records)
    latency = [float(r["p50_ms"]) for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, metric in zip(axes, METRICS):
        xs = [float(r[metric]) / 1e6 for r in records]
        ax.scatter(xs, latency)
        for x, y, r in zip(xs, latency, records):
            ax.annotate(str(r.get("name", "")), (x, y), fontsize=6, alpha=0.7)
        ax.set_xlabel(f"{metric} (M)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"{metric}: r = {corr[f'r_{metric}']:.3f}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency vs complexity on {device_name} (n={corr['n']})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
