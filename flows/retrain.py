"""The main flow: data → validation → anchors → methods → profiling → winners → registry → store."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow

from flows.runners import build_task_runner, shared_api
from infra.devices import load_inventory, select_devices
from methods.base import Candidate
from methods.profiling import DeviceProfile
from podium.config import PodiumConfig, load_config
from registry.mlflow_registry import ModelRegistry, first_line
from tasks.anchors import acquire_anchors
from tasks.common import RunContext, artifact_root, load_data
from tasks.data import validate_data, version_dataset
from tasks.profile import profile_candidates
from tasks.release import Outcome, promote_and_publish, select_winner
from tasks.report import write_report
from tasks.runs import config_digest, last_completed_run, promotion_lock
from tasks.train import offer_candidates, train_method, training_key


@dataclass
class RetrainResult:
    run_id: str
    data_hash: str
    outcomes: list[Outcome]
    winners: dict[str, Candidate]
    cached_methods: list[str]  # methods whose training was reused from the task cache
    report: str
    skipped: bool = False  # ended early: data and config equal the last completed run's


class BranchError(RuntimeError):
    """Some methods or devices failed; the rest of the run finished (one line naming each failure)."""


def git_sha(project_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def merge_candidates(devices: list[DeviceProfile], anchors: list[Candidate],
                     per_method: list[dict[str, list[Candidate]]]) -> dict[str, list[Candidate]]:
    """Every device is offered the anchors plus what each method offers it (names unique)."""
    merged: dict[str, list[Candidate]] = {}
    for device in devices:
        seen: dict[str, Candidate] = {c.name: c for c in anchors}
        for offered in per_method:
            for cand in offered.get(device.name, []):
                seen.setdefault(cand.name, cand)
        merged[device.name] = list(seen.values())
    return merged


@flow(name="retrain", log_prints=True)
def retrain(config_path: str = "configs/demo.yaml", project_dir: str = ".",
            skip_if_unchanged: bool = False) -> RetrainResult:
    """``skip_if_unchanged`` (scheduled deployments): end right after the dataset is versioned when
    its hash and the config equal the last completed run's. Off by default: interactive runs re-run
    every step (cached trainings make that fast)."""
    cfg: PodiumConfig = load_config(config_path)
    devices = select_devices(load_inventory(Path(cfg.devices.inventory)), cfg.devices.use, config_path)
    project = Path(project_dir).resolve()
    # Per thread: it limits the work done in this thread (anchors, profiling). Trainings submitted to the
    # thread pool start with OpenMP's default (every core); on 2 cores that beat 1 thread each (demo 143 s
    # vs 214 s for Dask workers pinned to 1 thread; 2 threads per Dask worker: 239-550 s, oversubscribed).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.runtime.max_workers))

    registry = ModelRegistry(cfg.tracking.uri, artifact_root(project, cfg.tracking.artifact_root))
    registry.check_reachable()
    digest = config_digest(cfg, devices)
    run_id = registry.start_run(cfg.tracking.experiment, "retrain", tags={"config": config_path, "config_digest": digest})
    ctx = RunContext(cfg=cfg, project_dir=str(project), run_id=run_id, git_sha=git_sha(project))
    try:
        registry.log_params(run_id, cfg.model_dump(mode="json", exclude={"tracking"}))
        ctx.open_store().list(f"{cfg.model_name}/")  # no training for a store we could not publish to
        ref = version_dataset(ctx)
        registry.client.set_tag(run_id, "data_hash", ref.data_hash)
        if skip_if_unchanged:
            baseline = last_completed_run(registry, cfg.tracking.experiment, ref.data_hash, digest)
            if baseline is not None:
                message = (f"data {ref.data_hash} and config {digest} are unchanged since run {baseline}: "
                           "ending early, nothing trained or promoted")
                print(message)
                registry.client.set_tag(run_id, "skipped", "unchanged")
                registry.client.set_tag(run_id, "skipped_baseline", baseline)
                registry.end_run(run_id, "FINISHED")
                return RetrainResult(run_id, ref.data_hash, [], {}, [], message, skipped=True)
        validate_data(ctx, ref)
        anchors, teacher, anchor_candidates = acquire_anchors(ctx, ref)

        results = ctx.cache_path / "results"
        futures = {m: train_method.with_options(result_storage=results).submit(ctx, ref, m, anchors, teacher)
                   for m in cfg.methods}
        spaces, failed = {}, []
        for m, f in futures.items():  # every training done before any search; a failed one drops out
            space = f.result(raise_on_failure=False)
            if isinstance(space, BaseException):
                failed.append(f"method {m}: {first_line(space)}")
            else:
                spaces[m] = space
        offered = [offer_candidates.with_options(result_storage=results)(
                       ctx, m, space, devices, training_key(ctx, ref, m, anchors, teacher))
                   for m, space in spaces.items()]  # one at a time: a space may measure latency while searching
        candidates = merge_candidates(devices, anchor_candidates, offered)
        cached = [m for m, f in futures.items() if f.state.name == "Cached"]

        stats, exports = profile_candidates(ctx, candidates, devices, load_data(ctx, ref).input_spec.channels,
                                            cfg.devices.remote_timeout_s)
        outcomes, winners = [], {}
        with promotion_lock(ctx.cache_path, cfg.model_name):  # no two runs promote at once
            for device in devices:
                device_stats = stats.get(device.name, {})
                winner = select_winner(candidates[device.name], device_stats, device)
                if winner is not None:
                    winners[device.name] = winner
                outcome = promote_and_publish(
                    ctx, ref, device, winner, device_stats.get(winner.name) if winner else None,
                    exports.get(winner.name) if winner else None, return_state=True).result(raise_on_failure=False)
                if isinstance(outcome, BaseException):  # this device keeps its release; the others go on
                    failed.append(f"device {device.name}: {first_line(outcome)}")
                    outcome = Outcome(device.name, winner.name if winner else None, reason=f"failed: {first_line(outcome)}")
                outcomes.append(outcome)
        report = write_report(ctx, devices, candidates, stats, outcomes)
        print(report)
        if failed:
            raise BranchError("; ".join(failed))
        registry.client.set_tag(run_id, "completed", "true")  # last: the baseline for skip_if_unchanged
        registry.end_run(run_id, "FINISHED")
        return RetrainResult(run_id, ref.data_hash, outcomes, winners, cached, report)
    except BaseException:
        registry.end_run(run_id, "FAILED")
        raise


def run_retrain(config_path: str, project_dir: str = ".", skip_if_unchanged: bool = False) -> RetrainResult:
    """Run the flow with the task runner the config asks for."""
    cfg = load_config(config_path)  # fail on a bad config before Prefect starts
    with shared_api(cfg.runtime):
        return retrain.with_options(task_runner=build_task_runner(cfg.runtime))(
            config_path=config_path, project_dir=project_dir, skip_if_unchanged=skip_if_unchanged)


def serve_retrain(name: str, cron: str, config_path: str, project_dir: str = ".") -> None:
    """Serve the flow on a cron schedule from this process (blocks until stopped).

    Scheduled runs pass ``skip_if_unchanged=True``: a tick with the same data and config ends early.
    Paths are made absolute because the runner starts each flow run in a subprocess."""
    load_config(config_path)  # fail on a bad config before Prefect starts
    parameters = {"config_path": str(Path(config_path).resolve()), "project_dir": str(Path(project_dir).resolve()),
                  "skip_if_unchanged": True}
    retrain.serve(name=name, cron=cron, parameters=parameters)
