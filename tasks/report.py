"""The run report: per-device tables and Pareto plots, and a summary of winners across devices.

Plots are drawn once per content: a PNG is kept under ``<cache>/plots/<key>.png``, keyed on exactly
what is drawn (the rows or records, the device, the plotting code and matplotlib's version), so a
re-run with unchanged results logs the same file without importing matplotlib or drawing again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from methods.base import Candidate
from methods.pareto import pareto_front
from methods.profiling import DeviceProfile, LatencyStats
from tasks.common import TRANSIENT_RETRIES, RunContext
from tasks.release import Outcome


def device_rows(candidates: list[Candidate], stats: dict[str, LatencyStats], device: DeviceProfile,
                outcome: Outcome | None) -> list[dict]:
    rows = []
    for cand in candidates:
        s = stats.get(cand.name)
        rows.append({
            "candidate": cand.name, "method": cand.method, "val_acc": cand.metrics["val_acc"],
            "flops": cand.metrics.get("flops"), "p50_ms": s.p50_ms if s else None,
            "budget_ms": device.latency_budget_ms,
            "winner": bool(outcome and outcome.winner == cand.name),
            "alias": (f"{device.name} -> v{outcome.version}" if outcome and outcome.winner == cand.name
                      and outcome.alias_moved else ""),
        })
    return sorted(rows, key=lambda r: (r["p50_ms"] is None, r["p50_ms"] or 0))


def format_table(device: DeviceProfile, rows: list[dict], outcome: Outcome | None) -> str:
    header = f"{'candidate':<46} {'method':<12} {'val_acc':>7} {'p50 ms':>8} {'budget':>7}  winner"
    lines = [f"== {device.name} ({device.runtime}, {device.threads} thread(s), batch {device.batch_size}) ==",
             header, "-" * len(header)]
    for r in rows:
        p50 = f"{r['p50_ms']:.3f}" if r["p50_ms"] is not None else "n/a"
        mark = "*" if r["winner"] else ("" if r["p50_ms"] is not None and r["p50_ms"] <= r["budget_ms"] else "over")
        lines.append(f"{r['candidate'][:46]:<46} {r['method']:<12} {r['val_acc']:>7.4f} {p50:>8} "
                     f"{r['budget_ms']:>7.3g}  {mark}")
    if outcome is not None:
        alias = f"alias {device.name} -> v{outcome.version}" if outcome.alias_moved else "alias unchanged"
        lines.append(f"winner: {outcome.winner or 'none'} ({alias}; {outcome.reason})")
    return "\n".join(lines)


def plot_device(device: DeviceProfile, rows: list[dict], path: Path) -> Path:
    import matplotlib  # only when a plot is drawn (not cached): about 0.5 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(sorted({r["method"] for r in measured})):
        pts = [r for r in measured if r["method"] == method]
        ax.scatter([r["p50_ms"] for r in pts], [r["val_acc"] for r in pts], label=method, color=f"C{i}", s=24)
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


def cached_plot(cache_dir: Path, what: dict[str, Any], code: tuple[Any, ...], path: Path,
                draw: Callable[[Path], Path]) -> Path:
    """``draw(path)``, or a copy of the PNG an earlier call drew from the same ``what`` and ``code``.

    ``what`` must hold everything the drawing reads; ``code`` the modules (or functions) that draw.
    """
    from importlib.metadata import version

    from tasks.common import source_digest

    doc = {"what": what, "code": source_digest(*code), "matplotlib": version("matplotlib")}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    cached = cache_dir / "plots" / f"{key}.png"
    if cached.is_file():
        shutil.copyfile(cached, path)
        return path
    draw(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(cached)
    return path


def _device_plot(ctx: RunContext, device: DeviceProfile, rows: list[dict], path: Path) -> Path:
    # Every row field but the alias (not drawn; it names the version a re-run does not move).
    drawn = [{k: v for k, v in r.items() if k != "alias"} for r in rows]
    what = {"device": device.model_dump(mode="json"), "rows": drawn}
    return cached_plot(ctx.cache_path, what, (sys.modules[__name__], pareto_front), path,
                       lambda p: plot_device(device, rows, p))


def winners_markdown(outcomes: list[Outcome], tables: dict[str, list[dict]]) -> str:
    lines = ["| device | winner | method | val_acc | p50 ms | budget ms | version | alias |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        row = next((r for r in tables.get(o.device, []) if r["winner"]), None)
        if row is None:
            lines.append(f"| {o.device} | none | | | | | | {o.reason} |")
            continue
        lines.append(f"| {o.device} | {o.winner} | {row['method']} | {row['val_acc']:.4f} | {row['p50_ms']:.3f} | "
                     f"{row['budget_ms']:.3g} | v{o.version} | {'moved' if o.alias_moved else 'kept'}: {o.reason} |")
    return "\n".join(lines)


def _log_runtime_correlation(ctx: RunContext, device: DeviceProfile, candidates: list[Candidate],
                             stats: dict[str, LatencyStats], folder: Path) -> None:
    """The scaling paper's analysis on this device: measured latency vs flops, params and acts."""
    from methods.scaling import plot_runtime_correlation, runtime_correlation

    records = [{"name": c.name, "p50_ms": stats[c.name].p50_ms, **{k: c.metrics[k] for k in ("flops", "params", "acts")}}
               for c in candidates if c.method == "scaling" and c.name in stats]
    if len(records) < 3:
        return
    corr = runtime_correlation(records)
    ctx.registry.log_metrics(ctx.run_id, {k: v for k, v in corr.items() if k.startswith("r_")},
                             prefix=f"scaling.{device.name}.")
    ctx.registry.log_dict(ctx.run_id, {"correlation": corr, "records": records},
                          f"report/scaling_runtime_{device.name}.json")
    plot = cached_plot(ctx.cache_path, {"device": device.name, "records": records}, (plot_runtime_correlation,),
                       folder / f"scaling_runtime_{device.name}.png",
                       lambda p: plot_runtime_correlation(records, p, device.name))
    ctx.registry.log_artifact(ctx.run_id, plot, "report")


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="run-report", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def write_report(ctx: RunContext, devices: list[DeviceProfile], candidates: dict[str, list[Candidate]],
                 stats: dict[str, dict[str, LatencyStats]], outcomes: list[Outcome]) -> str:
    """Log per-device tables and plots plus the winners' summary to MLflow; return the text report."""
    by_device = {o.device: o for o in outcomes}
    tables: dict[str, list[dict]] = {}
    texts = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            rows = device_rows(candidates.get(device.name, []), stats.get(device.name, {}), device,
                               by_device.get(device.name))
            tables[device.name] = rows
            texts.append(format_table(device, rows, by_device.get(device.name)))
            if device.name in stats:
                plot = _device_plot(ctx, device, rows, Path(tmp) / f"{device.name}.png")
                ctx.registry.log_artifact(ctx.run_id, plot, "report")
            ctx.registry.log_dict(ctx.run_id, rows, f"report/{device.name}.json")
            _log_runtime_correlation(ctx, device, candidates.get(device.name, []), stats.get(device.name, {}),
                                     Path(tmp))
        summary = winners_markdown(outcomes, tables)
        ctx.registry.log_text(ctx.run_id, summary + "\n", "report/winners.md")
    return "\n\n".join(texts) + "\n\n" + summary
