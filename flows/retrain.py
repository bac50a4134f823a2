"""The main flow: data → validation → anchors → methods → profiling → precisions → winners → registry → store."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from prefect import flow, tags

from podium.errors import BranchError
from podium.flows.run_logs import forward_podium_logs
from podium.flows.runners import build_task_runner, run_api
from podium.methods.base import Candidate
from podium.methods.host import tune_allocator
from podium.tasks.anchors import acquire_anchors
from podium.tasks.common import RunContext
from podium.tasks.data import push_dataset, repository_writes, validate_data, version_dataset
from podium.tasks.profile import profile_candidates
from podium.tasks.quantize import derive_precisions
from podium.tasks.release import Outcome, promote_winners
from podium.tasks.report import write_report
from podium.tasks.runs import load_run_config, tracked_run
from podium.tasks.train import collect_offers, train_methods


@dataclass
class RetrainResult:
    run_id: str
    data_hash: str
    outcomes: list[Outcome]
    winners: dict[str, Candidate]
    cached_methods: list[str]  # methods whose training was reused from the task cache
    report: str
    skipped: bool = False  # ended early: data and config equal the last completed run's
    written: dict[str, str] | None = None  # where the run wrote: store, tracking, report, cache (see locations)


def run_tags(model_name: str) -> tuple[str, ...]:
    """What the runs of a retrain (flow and tasks) are tagged with in Prefect."""
    return ("podium", f"model:{model_name}")


def locations(ctx: RunContext) -> dict[str, str]:
    """Where a run writes, resolved: the release store, the tracking database and run, the run's
    report (MLflow artifacts) and the cache (validation facts, task results, locks)."""
    report = f"{ctx.registry.client.get_run(ctx.run_id).info.artifact_uri}/report"
    return {"store": ctx.store_uri, "tracking": f"{ctx.tracking_uri} (run {ctx.run_id})", "report": report,
            "cache": str(ctx.cache_path.resolve()), **repository_writes(ctx)}  # dvc: files to commit, remote


@flow(name="retrain", log_prints=True)
def retrain(config_path: str = "configs/demo.yaml", project_dir: str = ".",
            skip_if_unchanged: bool = False) -> RetrainResult:
    """``skip_if_unchanged`` (scheduled deployments): end right after the dataset is versioned when
    its hash and the config equal the last completed run's. Off by default: interactive runs re-run
    every step (cached trainings make that fast)."""
    forward_podium_logs()  # podium.* lines in this run's logs, also when a worker started it
    tune_allocator()  # training steps stop page-faulting their buffers in again (bench/training_steps.py)
    cfg, devices = load_run_config(config_path)
    # Per thread: the flow body's own work (evaluations, ONNX export). Each training sets its thread's
    # budget itself (tasks.common.training_env_for): a pool thread does not inherit this one's.
    torch.set_num_threads(cfg.runtime.training_threads)
    # every task run of this flow carries these tags (the UI filters on them)
    with tags(*run_tags(cfg.model_name)), tracked_run(cfg, devices, config_path, project_dir) as run:
        ctx = run.ctx
        ref = version_dataset(ctx)
        run.tag(data_hash=ref.data_hash)
        if skip_if_unchanged and (baseline := run.unchanged_since(ref)):
            print(message := run.skip(ref, baseline))
            return RetrainResult(ctx.run_id, ref.data_hash, [], {}, [], message, skipped=True, written=locations(ctx))
        validated = validate_data(ctx, ref)
        push_dataset(ctx, ref, validated)  # only validated data reaches the DVC remote
        anchors, teacher, anchor_candidates = acquire_anchors(ctx, ref)
        spaces, keys, cached, failed = train_methods(ctx, ref, anchors, teacher)
        offers = collect_offers(ctx, spaces, keys, anchor_candidates, devices)
        pool = profile_candidates(ctx, offers, devices, cfg.devices.remote_timeout_s)
        pool += derive_precisions(ctx, ref, pool, devices)
        outcomes, winners, failed_devices = promote_winners(ctx, ref, pool, devices)
        report = write_report(ctx, devices, pool, outcomes, spaces)
        print(report)
        if failed + failed_devices:
            raise BranchError("; ".join(failed + failed_devices))
        run.complete()
        return RetrainResult(ctx.run_id, ref.data_hash, outcomes, {d: w.candidate for d, w in winners.items()},
                             cached, report, written=locations(ctx))


def run_retrain(config_path: str, project_dir: str = ".", skip_if_unchanged: bool = False) -> RetrainResult:
    """Run the flow with the task runner the config asks for."""
    cfg, _devices = load_run_config(config_path)  # fail on a bad config before Prefect starts
    with run_api(), tags(*run_tags(cfg.model_name)):
        return retrain.with_options(task_runner=build_task_runner(cfg.runtime))(
            config_path=config_path, project_dir=project_dir, skip_if_unchanged=skip_if_unchanged)


def serve_retrain(name: str, cron: str, config_path: str, project_dir: str = ".") -> None:
    """Serve the flow on a cron schedule from this process (blocks until stopped).

    Scheduled runs pass ``skip_if_unchanged=True``: a tick with the same data and config ends early.
    Paths are made absolute because the runner starts each flow run in a subprocess."""
    from pathlib import Path

    cfg, _devices = load_run_config(config_path)  # fail on a bad config before Prefect starts
    parameters = {"config_path": str(Path(config_path).resolve()), "project_dir": str(Path(project_dir).resolve()),
                  "skip_if_unchanged": True}
    retrain.serve(name=name, cron=cron, parameters=parameters, tags=list(run_tags(cfg.model_name)))
