"""The run report: per-device tables and Pareto plots, each method's own tables and plots, and a
summary of winners across devices. Every plot is drawn here (:mod:`podium.tasks.plots`).

Logged to the run in MLflow, and shown in Prefect as artifacts with stable keys: the winners as a
table (``<model>-winners``) and each device's candidates, front and MLflow run as markdown
(``<model>-front-<device>``).

Plots are drawn once per content: a PNG is kept under ``<cache>/plots/<key>.png``, keyed on exactly
what is drawn (the rows or records, the device, the plotting code and matplotlib's version), so a
re-run with unchanged results logs the same file without importing matplotlib or drawing again.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from podium.errors import RegistryError
from podium.files import atomic_copy
from podium.methods.base import CandidateSpace
from podium.methods.pareto import pareto_front
from podium.methods.profiling import DeviceProfile
from podium.methods.scaling import runtime_correlation
from podium.tasks import plots
from podium.tasks.artifacts import artifact_key, in_prefect_run, mlflow_run_link, publish
from podium.tasks.common import TRANSIENT_RETRIES, RunContext
from podium.tasks.plots import MIN_POINTS_FOR_R, plot_device, plot_pareto, plot_runtime_correlation
from podium.tasks.profile import MeasuredCandidate
from podium.tasks.release import Outcome


def device_rows(pool: list[MeasuredCandidate], device: DeviceProfile, outcome: Outcome | None) -> list[dict]:
    rows = []
    for member in pool:
        if device.name not in member.offered_to:
            continue
        cand, s = member.candidate, member.stats.get(device.name)
        rows.append({
            "candidate": cand.name, "method": cand.method, "precision": member.precision, "parent": member.parent,
            "val_acc": cand.metrics["val_acc"], "flops": cand.metrics.get("flops"),
            "p50_ms": s.p50_ms if s else None, "p90_ms": s.p90_ms if s else None,
            "p50_low_ms": s.p50_low_ms if s else None, "p50_high_ms": s.p50_high_ms if s else None,
            "verdict": s.budget_verdict(device.latency_budget_ms) if s else None,
            "noisy": s.noisy if s else None, "interference": s.interference if s else "",
            "peak_mem_mb": s.peak_mem_mb if s else None, "budget_ms": device.latency_budget_ms,
            "mem_budget_mb": device.memory_budget_mb, "runtime": device.runtime,
            "train_images": cand.metrics.get("train_images"), "train_device_s": cand.metrics.get("train_device_s"),
            "winner": bool(outcome and outcome.winner == cand.name),
            "tied": bool(outcome and cand.name in outcome.tied),
            "alias": (f"{device.name} -> v{outcome.version}" if outcome and outcome.winner == cand.name
                      and outcome.alias_moved else ""),
        })
    return sorted(rows, key=lambda r: (r["p50_ms"] is None, r["p50_ms"] or 0))


def _within(row: dict) -> bool:
    """Within both budgets: the whole latency interval, and memory."""
    return row["verdict"] == "within" and row["peak_mem_mb"] <= row["mem_budget_mb"]


def _interval(row: dict) -> str:
    return f"[{row['p50_low_ms']:.3f}, {row['p50_high_ms']:.3f}]" if row["p50_low_ms"] is not None else "n/a"


def format_table(device: DeviceProfile, rows: list[dict], outcome: Outcome | None) -> str:
    header = (f"{'candidate':<46} {'method':<12} {'prec':<5} {'val_acc':>7} {'p50 ms':>8} {'95% interval':>17} "
              f"{'p90 ms':>8} {'peak MB':>8} {'budget':>7}  winner")
    lines = [f"== {device.name} ({device.runtime}, {device.threads} thread(s), batch {device.batch_size}, "
             f"{'/'.join(device.precisions)}, {device.memory_budget_mb:g} MB) ==", header, "-" * len(header)]
    for r in rows:
        p50, p90, mem = ((f"{r[k]:.3f}" if k != "peak_mem_mb" else f"{r[k]:.1f}") if r[k] is not None else "n/a"
                         for k in ("p50_ms", "p90_ms", "peak_mem_mb"))
        if r["winner"]:
            mark = "*"
        elif r["verdict"] == "ambiguous":
            mark = "straddles"
        else:
            mark = "" if _within(r) else "over"
        mark += " (tie)" if r.get("tied") else ""
        mark += " noisy" if r["noisy"] else ""
        lines.append(f"{r['candidate'][:46]:<46} {r['method']:<12} {r['precision']:<5} {r['val_acc']:>7.4f} {p50:>8} "
                     f"{_interval(r):>17} {p90:>8} {mem:>8} {r['budget_ms']:>7g}  {mark}")
    lines += precision_lines(rows)
    noisy = [r for r in rows if r["noisy"]]
    if noisy:
        lines.append(f"noisy: {len(noisy)} of {len(rows)} measurements ({noisy[0]['candidate']}: "
                     f"{noisy[0]['interference']})")
    if outcome is not None:
        alias = f"alias {device.name} -> v{outcome.version}" if outcome.alias_moved else "alias unchanged"
        won = next((r for r in rows if r["winner"]), None)
        lines.append(f"winner: {outcome.winner or 'none'} ({alias}; {outcome.reason})"
                     + (f"; cost: {training_cost(won)}" if won else ""))
        if outcome.winner:
            lines.append(f"chosen: {outcome.chosen}" + (f"; tied with {', '.join(outcome.tied)}" if outcome.tied else ""))
    return "\n".join(lines)


def precision_summary(rows: list[dict]) -> list[dict]:
    """Per method and derived precision on one device: mean speed-up over the FP32 parent, mean
    accuracy change (points), and the best accuracy within budget with and without that precision."""
    by_name = {r["candidate"]: r for r in rows}
    out = []
    for method, precision in sorted({(r["method"], r["precision"]) for r in rows if r["parent"]}):
        pairs = [(r, by_name[r["parent"]]) for r in rows if r["method"] == method and r["precision"] == precision
                 and r["parent"] in by_name and r["p50_ms"] and by_name[r["parent"]]["p50_ms"]]
        if not pairs:
            continue
        fp32 = [r for r in rows if r["method"] == method and r["precision"] == "fp32" and _within(r)]
        both = fp32 + [r for r, _ in pairs if _within(r)]
        out.append({"method": method, "precision": precision, "models": len(pairs),
                    "speedup": sum(p["p50_ms"] / r["p50_ms"] for r, p in pairs) / len(pairs),
                    "acc_change_pts": 100 * sum(r["val_acc"] - p["val_acc"] for r, p in pairs) / len(pairs),
                    "best_fp32": max((r["val_acc"] for r in fp32), default=None),
                    "best_with": max((r["val_acc"] for r in both), default=None)})
    return out


def precision_lines(rows: list[dict]) -> list[str]:
    fmt = lambda v: f"{v:.4f}" if v is not None else "none"  # noqa: E731
    return [f"{s['precision']} for {s['method']}: {s['speedup']:.2f}x faster, {s['acc_change_pts']:+.2f} pts "
            f"over {s['models']} model(s); best within budget {fmt(s['best_fp32'])} fp32 -> {fmt(s['best_with'])}"
            for s in precision_summary(rows)]


def training_cost(row: dict) -> str:
    """What it cost to get a candidate: its method's training (an anchor's is not counted here)."""
    if row.get("train_images") is None:
        return "anchor (acquired, not trained by a method)"
    return f"{row['train_images'] / 1e3:.1f}k images, {row['train_device_s']:.0f} device-s"


def cached_plot(cache_dir: Path, what: dict[str, Any], code: tuple[Any, ...], path: Path,
                draw: Callable[[Path], Path]) -> Path:
    """``draw(path)``, or a copy of the PNG an earlier call drew from the same ``what`` and ``code``.

    ``what`` must hold everything the drawing reads; ``code`` the modules (or functions) that draw.
    """
    from importlib.metadata import version

    from podium.tasks.common import source_digest

    doc = {"what": what, "code": source_digest(*code), "matplotlib": version("matplotlib")}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    cached = cache_dir / "plots" / f"{key}.png"
    if cached.is_file():
        shutil.copyfile(cached, path)
        return path
    draw(path)
    atomic_copy(path, cached)
    return path


def _device_plot(ctx: RunContext, device: DeviceProfile, rows: list[dict], path: Path) -> Path:
    # Every row field but the alias (not drawn; it names the version a re-run does not move).
    drawn = [{k: v for k, v in r.items() if k != "alias"} for r in rows]
    what = {"device": device.model_dump(mode="json"), "rows": drawn}
    return cached_plot(ctx.cache_path, what, (plots,), path, lambda p: plot_device(device, rows, p))


def winners_markdown(outcomes: list[Outcome], tables: dict[str, list[dict]]) -> str:
    lines = ["| device | winner | method | runtime | precision | val_acc | p50 ms [95% interval] | peak MB | budget ms "
             "| training cost | version | alias | chosen because |", "|---" * 13 + "|"]
    for o in outcomes:
        row = next((r for r in tables.get(o.device, []) if r["winner"]), None)
        if row is None:
            lines.append(f"| {o.device} | none | | | | | | | | | | {o.reason} | |")
            continue
        lines.append(f"| {o.device} | {o.winner} | {row['method']} | {row['runtime']} | {row['precision']} | "
                     f"{row['val_acc']:.4f} | {row['p50_ms']:.3f} {_interval(row)} | {row['peak_mem_mb']:.1f} | "
                     f"{row['budget_ms']:g} | {training_cost(row)} | v{o.version} | "
                     f"{'moved' if o.alias_moved else 'kept'}: {o.reason} | {o.chosen} |")
    return "\n".join(lines)


def _log_runtime_correlation(ctx: RunContext, device: DeviceProfile, pool: list[MeasuredCandidate],
                             folder: Path) -> None:
    """The scaling paper's analysis on this device: measured latency vs flops, params and acts."""
    records = [{"name": m.name, "p50_ms": m.stats[device.name].p50_ms,
                **{k: m.candidate.metrics[k] for k in ("flops", "params", "acts")}}
               for m in pool if m.candidate.method == "scaling" and device.name in m.stats]
    if len(records) < 3:
        return
    corr = runtime_correlation(records)
    if corr["n"] >= MIN_POINTS_FOR_R:  # an r over fewer points is not a figure to compare runs on
        ctx.registry.log_metrics(ctx.run_id, {k: v for k, v in corr.items() if k.startswith("r_")},
                                 prefix=f"scaling.{device.name}.")
    ctx.registry.log_dict(ctx.run_id, {"correlation": corr, "records": records},
                          f"report/scaling_runtime_{device.name}.json")
    plot = cached_plot(ctx.cache_path, {"device": device.name, "records": records}, (plots,),
                       folder / f"scaling_runtime_{device.name}.png",
                       lambda p: plot_runtime_correlation(records, p, device.name))
    ctx.registry.log_artifact(ctx.run_id, plot, "report")


def _log_method_tables(ctx: RunContext, spaces: dict[str, CandidateSpace], folder: Path) -> None:
    """Each space's own tables as JSON under ``methods/<name>/``; tables of accuracy against flops
    (e.g. every SN-Net stitch) also as a front plot."""
    for method, space in spaces.items():
        for table, rows in space.tables().items():
            ctx.registry.log_dict(ctx.run_id, rows, f"methods/{method}/{table}.json")
            if rows and all("flops" in r and "val_acc" in r for r in rows):
                plot = cached_plot(ctx.cache_path, {"table": table, "rows": rows}, (plots,), folder / f"{table}.png",
                                   lambda p, rows=rows, table=table, method=method: plot_pareto(
                                       rows, p, title=f"{method}: {table}", method=method))
                ctx.registry.log_artifact(ctx.run_id, plot, f"methods/{method}")


def winners_table(outcomes: list[Outcome], tables: dict[str, list[dict]], devices: list[DeviceProfile]
                  ) -> list[dict[str, str]]:
    """One row per device for the Prefect table artifact: the model that won, its method and precision,
    accuracy, p50 with its 95 % interval, the budget, and why (the choice and the promotion)."""
    budgets = {d.name: d.latency_budget_ms for d in devices}
    out = []
    for o in outcomes:
        row = next((r for r in tables.get(o.device, []) if r["winner"]), None)
        promotion = f"alias moved to v{o.version}" if o.alias_moved else "alias kept"
        out.append({
            "device": o.device, "model": o.winner or "none", "method": row["method"] if row else "",
            "precision": row["precision"] if row else "",
            "accuracy": f"{row['val_acc']:.4f}" if row else "",
            "p50 ms [95% interval]": f"{row['p50_ms']:.3f} {_interval(row)}" if row and row["p50_ms"] is not None else "",
            "budget ms": f"{budgets.get(o.device, math.nan):g}",
            "why": "; ".join(x for x in (o.chosen, f"{promotion}: {o.reason}" if o.winner else o.reason) if x),
        })
    return out


def device_markdown(device: DeviceProfile, rows: list[dict], outcome: Outcome | None, run_link: str) -> str:
    """A device's candidates as markdown, fastest first: accuracy, p50 with its interval, memory,
    whether each is within budget and on the accuracy-latency front; the winner, and the MLflow run."""
    measured = [r for r in rows if r["p50_ms"] is not None]
    front = {r["candidate"] for r in pareto_front(measured, cost=lambda r: r["p50_ms"], value=lambda r: r["val_acc"])}
    settings = (f"{device.runtime}, {device.threads} thread(s), batch {device.batch_size}, budget "
                f"{device.latency_budget_ms:g} ms and {device.memory_budget_mb:g} MB, {'/'.join(device.precisions)}")
    lines = [f"# {device.name}: accuracy vs latency", settings, ""]
    if outcome is not None:
        lines += [f"**Winner: {outcome.winner or 'none'}** ({outcome.chosen or outcome.reason})", ""]
    lines += ["| candidate | method | precision | val_acc | p50 ms [95% interval] | peak MB | budget | front | winner |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured_row = r["p50_ms"] is not None
        verdict = ("within" if _within(r) else "straddles" if r["verdict"] == "ambiguous" else "over") \
            if measured_row else "not measured"
        lines.append(f"| {r['candidate']} | {r['method']} | {r['precision']} | {r['val_acc']:.4f} | "
                     + (f"{r['p50_ms']:.3f} {_interval(r)} | {r['peak_mem_mb']:.1f} | " if measured_row else "n/a | n/a | ")
                     + f"{verdict}{' (noisy)' if r['noisy'] else ''} | {'yes' if r['candidate'] in front else ''} | "
                     f"{'*' if r['winner'] else ''} |")
    lines += ["", f"{run_link}: plot `report/{device.name}.png`, rows `report/{device.name}.json`."]
    return "\n".join(lines)


def _run_link(ctx: RunContext) -> str:
    try:
        experiment_id = ctx.registry.client.get_run(ctx.run_id).info.experiment_id
    except (MlflowException, RegistryError, OSError):
        experiment_id = None
    return mlflow_run_link(ctx.tracking_uri, experiment_id, ctx.run_id)


def publish_artifacts(ctx: RunContext, devices: list[DeviceProfile], tables: dict[str, list[dict]],
                      outcomes: list[Outcome]) -> None:
    """The winners table and each device's front as Prefect artifacts (nothing outside a Prefect run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if not in_prefect_run():
        return
    model = ctx.cfg.model_name
    by_device = {o.device: o for o in outcomes}
    link = _run_link(ctx)
    publish("winners", lambda: create_table_artifact(
        winners_table(outcomes, tables, devices), key=artifact_key(model, "winners"),
        description=f"{model}: the winner of each device ({link})"))
    for device in devices:
        markdown = device_markdown(device, tables.get(device.name, []), by_device.get(device.name), link)
        publish(f"front of {device.name}", lambda markdown=markdown, device=device: create_markdown_artifact(
            markdown, key=artifact_key(model, "front", device.name), description=f"{model} on {device.name}"))


# cache_policy=NO_CACHE: never reused across runs, and Prefect's default policy would hash every input
# (cloudpickling every model passed in: about 1 s per call) just to look for a cache entry.
@task(name="run-report", task_run_name="report", tags=["report"], cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def write_report(ctx: RunContext, devices: list[DeviceProfile], pool: list[MeasuredCandidate],
                 outcomes: list[Outcome], spaces: dict[str, CandidateSpace] | None = None) -> str:
    """Log per-device tables and plots, the methods' tables and the winners' summary to MLflow;
    return the text report."""
    by_device = {o.device: o for o in outcomes}
    tables: dict[str, list[dict]] = {}
    texts = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            rows = device_rows(pool, device, by_device.get(device.name))
            tables[device.name] = rows
            texts.append(format_table(device, rows, by_device.get(device.name)))
            if any(device.name in m.stats for m in pool):
                plot = _device_plot(ctx, device, rows, Path(tmp) / f"{device.name}.png")
                ctx.registry.log_artifact(ctx.run_id, plot, "report")
            ctx.registry.log_dict(ctx.run_id, rows, f"report/{device.name}.json")
            if precisions := precision_summary(rows):
                ctx.registry.log_dict(ctx.run_id, precisions, f"report/{device.name}_precisions.json")
            _log_runtime_correlation(ctx, device, pool, Path(tmp))
        _log_method_tables(ctx, spaces or {}, Path(tmp))
        summary = winners_markdown(outcomes, tables)
        ctx.registry.log_text(ctx.run_id, summary + "\n", "report/winners.md")
    publish_artifacts(ctx, devices, tables, outcomes)
    return "\n\n".join(texts) + "\n\n" + summary
