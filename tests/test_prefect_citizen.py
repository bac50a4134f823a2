"""Podium as a Prefect citizen, and plots a reader can trust.

The plots' small decisions are unit tests (one colour per method, a log latency axis past 10x, no r
under 5 points). Against one real `prefect server` on 127.0.0.1 (the session's): a flow running the
real training and report tasks leaves a progress bar, the winners table and each device's front as
artifacts with stable keys, its task runs named and tagged; and the `profile` flow, deployed to a work
pool and started by a process worker, has Podium's own (``podium.*``) lines in its logs as the Prefect
client reads them back.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow
from torch import nn

from podium.methods.profiling import DeviceProfile, LatencyStats
from podium.tasks import plots
from podium.tasks.artifacts import TrainingProgress, artifact_key, mlflow_run_link
from tests.prefect_server import PREFECT, REPO, create_pool, tail

MEASUREMENT = {"warmup": 1, "round_repeats": 2, "min_rounds": 3, "max_rounds": 3, "max_seconds": 1.0,
               "stable_tolerance": 0.5, "max_disturbed": 1.0}


def _row(candidate: str, method: str, p50: float, acc: float, precision: str = "fp32", winner: bool = False) -> dict:
    return {"candidate": candidate, "method": method, "precision": precision, "val_acc": acc, "p50_ms": p50,
            "p50_low_ms": 0.9 * p50, "p50_high_ms": 1.1 * p50, "winner": winner}


def _scatter_colours(fig: Any) -> dict[str, str]:
    """{legend label: hex colour} of every scatter in the figure's axes."""
    from matplotlib.colors import to_hex

    return {c.get_label(): to_hex(c.get_facecolor()[0]) for ax in fig.axes for c in ax.collections
            if not c.get_label().startswith("_") and len(c.get_facecolor())}


# ------------------------------------------------------------------------------ plots

def test_a_method_keeps_its_colour_in_every_plot_whatever_else_is_drawn() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    known = [plots.method_colour(m) for m in ("anchor", "stitching", "shrinking", "scaling", "self_distill")]
    assert len(set(known)) == len(known)  # distinct
    newcomer = plots.method_colour("new-method")
    assert newcomer == plots.method_colour("new-method") and newcomer in plots.SPARE_COLOURS  # by name alone
    device = DeviceProfile(name="cpu", latency_budget_ms=5.0)
    alone = plots.device_figure(device, [_row("s1", "scaling", 1.0, 0.9)])
    crowded = plots.device_figure(device, [_row("a1", "anchor", 2.0, 0.8), _row("s1", "scaling", 1.0, 0.9),
                                           _row("s1@int8", "scaling", 0.5, 0.88, precision="int8"),
                                           _row("b1", "new-method", 3.0, 0.7)])
    pareto = plots.pareto_figure([{"kind": "stitch", "flops": 2e6, "val_acc": 0.9},
                                  {"kind": "anchor", "flops": 1e6, "val_acc": 0.8}], method="stitching")
    correlation = plots.runtime_correlation_figure(
        [{"name": f"m{i}", "flops": i * 1e6, "params": i * 1e4, "acts": i * 1e4, "p50_ms": float(i)} for i in (1, 2, 3)],
        "cpu")
    try:
        # index-based colours (C0, C1, ...) gave scaling another colour once an anchor was plotted beside it
        assert _scatter_colours(alone)["scaling"] == _scatter_colours(crowded)["scaling"] == plots.method_colour("scaling")
        assert _scatter_colours(crowded)["scaling int8"] == plots.method_colour("scaling")  # precision: the marker
        assert _scatter_colours(crowded)["anchor"] == plots.method_colour("anchor")
        assert _scatter_colours(crowded)["new-method"] == newcomer
        assert _scatter_colours(pareto) == {"stitches": plots.method_colour("stitching"),
                                            "anchors": plots.method_colour("anchor")}
        panels = [to_hex(c.get_facecolor()[0]) for ax in correlation.axes for c in ax.collections]
        assert panels == [plots.method_colour("scaling")] * 3
    finally:
        for fig in (alone, crowded, pareto, correlation):
            plt.close(fig)


def test_the_latency_axis_turns_logarithmic_past_ten_times() -> None:
    import matplotlib.pyplot as plt

    assert not plots.log_scale_needed([1.0, 10.0])
    assert plots.log_scale_needed([1.0, 10.5])
    assert not plots.log_scale_needed([0.0, None, math.nan, 1.0, 9.0])  # only positive, finite values count
    assert not plots.log_scale_needed([3.0])
    rows = [_row("a", "scaling", 1.0, 0.9), _row("b", "scaling", 4.0, 0.95)]
    narrow = plots.device_figure(DeviceProfile(name="cpu", latency_budget_ms=5.0), rows)
    wide = plots.device_figure(DeviceProfile(name="cpu", latency_budget_ms=1000.0), rows)  # the budget line too
    records = [{"name": f"m{i}", "flops": i * 1e6, "params": i * 1e4, "acts": i * 1e4, "p50_ms": 0.5 * 3 ** i}
               for i in range(5)]
    correlation = plots.runtime_correlation_figure(records, "cpu")  # 0.5 .. 40.5 ms
    try:
        assert narrow.axes[0].get_xscale() == "linear" and wide.axes[0].get_xscale() == "log"
        assert {ax.get_yscale() for ax in correlation.axes} == {"log"}
    finally:
        for fig in (narrow, wide, correlation):
            plt.close(fig)


def test_r_is_printed_only_over_five_points_or_more() -> None:
    import matplotlib.pyplot as plt

    assert "r =" not in plots.correlation_title("flops", 0.97, 4)
    assert plots.correlation_title("flops", 0.97, 5) == "flops: r = 0.970"
    assert "r =" not in plots.correlation_title("flops", math.nan, 8)

    def titles(n: int) -> list[str]:
        records = [{"name": f"m{i}", "flops": (i + 1) * 1e6, "params": (i % 3 + 1) * 1e4, "acts": (i + 2) * 1e4,
                    "p50_ms": 1.0 + i * 0.1} for i in range(n)]
        fig = plots.runtime_correlation_figure(records, "cpu")
        try:
            return [ax.get_title() for ax in fig.axes]
        finally:
            plt.close(fig)

    assert not any("r =" in t for t in titles(4)) and all("too few points" in t for t in titles(4))
    assert all("r =" in t for t in titles(5))


def test_no_label_or_legend_falls_outside_the_figure() -> None:
    """The device plot's legend sits beside the axes (never over the points); constrained layout makes room
    for it and for every label, so no text ends outside the image (savefig also cuts with
    ``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt

    device = DeviceProfile(name="cpu", latency_budget_ms=5.0)
    long_name = "sn-resnet-small-stage3-block2-into-resnet-tiny-stage3-block1-linear"
    figures = [plots.device_figure(device, [_row(long_name, "stitching", 1.0, 0.9, winner=True),
                                            _row("a1", "anchor", 2.0, 0.8)]),
               plots.runtime_correlation_figure([{"name": f"scaled-model-{i}", "flops": i * 1e6, "params": i * 1e4,
                                                  "acts": i * 1e4, "p50_ms": float(i)} for i in range(1, 6)], "cpu")]
    try:
        for fig in figures:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            drawn, page = fig.get_tightbbox(renderer), fig.bbox_inches  # everything drawn; the figure (inches)
            assert page.x0 - 0.01 <= drawn.x0 and drawn.x1 <= page.x1 + 0.01
            assert page.y0 - 0.01 <= drawn.y0 and drawn.y1 <= page.y1 + 0.01
        legend = figures[0].axes[0].get_legend()
        assert f"winner: {long_name}" in [t.get_text() for t in legend.get_texts()]
        box, axes = legend.get_window_extent(renderer := figures[0].canvas.get_renderer()), figures[0].axes[0].bbox
        assert box.x0 >= axes.x1 and box.x1 <= figures[0].bbox.x1 + 1  # beside the points, inside the image
    finally:
        for fig in figures:
            plt.close(fig)


# ------------------------------------------------------------------------------ keys, links, logs

def test_artifact_keys_are_stable_and_accepted_and_runs_are_linked() -> None:
    assert artifact_key("digits-classifier", "front", "CPU_1t") == "digits-classifier-front-cpu-1t"
    assert artifact_key("m", "train", "self_distill") == "m-train-self-distill"
    with pytest.raises(ValueError):
        artifact_key("__")
    assert mlflow_run_link("http://127.0.0.1:5000/", "3", "abc") == \
        "[MLflow run abc](http://127.0.0.1:5000/#/experiments/3/runs/abc)"
    assert mlflow_run_link("sqlite:////tmp/mlflow.db", "3", "abc") == "MLflow run `abc` in `sqlite:////tmp/mlflow.db`"


def test_podium_logs_get_one_api_handler_however_often_a_flow_starts() -> None:
    from prefect.logging.handlers import APILogHandler

    from podium.flows.run_logs import forward_podium_logs

    logger = logging.getLogger("podium")
    before = list(logger.handlers)
    try:
        for handler in [h for h in before if isinstance(h, APILogHandler)]:
            logger.removeHandler(handler)  # as in a worker: Prefect configured logging before podium existed
        first = forward_podium_logs()
        assert forward_podium_logs() is first
        assert [h for h in logger.handlers if isinstance(h, APILogHandler)] == [first]
    finally:
        logger.handlers[:] = before


def test_the_training_loop_reports_progress_to_a_plain_callable() -> None:
    """methods/ stays free of Prefect: the hook is a callable in the TrainingEnv; outside a Prefect run the
    task's progress bar does nothing."""
    from podium.methods.checkpoint import TrainingEnv, training_env
    from podium.methods.train import TrainConfig, cross_entropy_loss, fit

    model = nn.Linear(4, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))),
                                         batch_size=8)
    seen: list[tuple] = []
    epochs: list[tuple] = []
    env = TrainingEnv(device="cpu", on_progress=lambda *a: seen.append(a), on_epoch=lambda *a: epochs.append(a))
    with training_env(env):
        fit(model, loader, cross_entropy_loss(model), TrainConfig(max_steps=6, log_every_s=1e-6), name="lin")
    assert seen[-1][:3] == ("lin", 6, 6) and len(seen) >= 2 and [s[1] for s in seen] == sorted(s[1] for s in seen)
    assert set(seen[-1][3]) == {"loss", "images_per_s", "epoch"} and seen[-1][3]["epoch"] == 1.5  # 4 batches/epoch
    assert [(name, epoch) for name, epoch, _ in epochs] == [("lin", 1)]  # one whole epoch in 6 steps
    idle = TrainingProgress("m", "lin")
    assert not idle.enabled
    idle("lin", 1, 6)  # no run, no API: nothing happens, nothing raises


def test_a_stalled_api_never_holds_the_training_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress bar's API calls leave from a thread of their own: while the API does not answer (an
    ephemeral server's SQLite held its lock ~55 s once), the training's progress calls return at once;
    every update is sent afterwards, in order, and ``finish`` waits for them."""
    import threading
    import time
    import uuid

    import prefect.artifacts

    answer, sent = threading.Event(), []

    def create(progress, key, description=None):
        answer.wait(10)  # the API is stalled until the test lets it answer
        sent.append((progress, description))
        return uuid.uuid4()

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", create)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress, description=None: sent.append((progress, description)))
    bar = TrainingProgress("m", "lin")
    bar.enabled = True  # as inside a task run
    start = time.monotonic()
    bar.start()
    for step in range(1, 4):
        bar("fit", step, 3)
    assert time.monotonic() - start < 1.0 and sent == []  # nothing answered yet, the training went on
    answer.set()
    bar.finish("trained")
    assert sent == [(0.0, "lin: starting"), (100 / 3, "lin: fit step 1/3"), (200 / 3, "lin: fit step 2/3"),
                    (100.0, "lin: fit step 3/3"), (100.0, "lin: trained")]


def test_a_device_without_a_winner_says_why_in_the_winners_table_and_its_front() -> None:
    from podium.tasks.release import Outcome
    from podium.tasks.report import device_markdown, device_rows, winners_table

    device = DeviceProfile(name="mcu", latency_budget_ms=0.5)
    outcome = Outcome(device="mcu", winner=None, reason="nothing within budget")
    rows = device_rows([_measured("anchor-a", "anchor", 0.9, 3.0, "mcu", 9e6),
                        _measured("scaling-s0", "scaling", 0.8, 1.0, "mcu", 1e6)], device, outcome)
    assert winners_table([outcome], {"mcu": rows}, [device]) == [{
        "device": "mcu", "model": "none", "method": "", "precision": "", "accuracy": "", "p50 ms [95% interval]": "",
        "budget ms": "0.5", "why": "nothing within budget"}]
    front = device_markdown(device, rows, outcome, "MLflow run `r` in `sqlite:///m.db`")
    assert "**Winner: none** (nothing within budget)" in front
    assert front.index("| scaling-s0 |") < front.index("| anchor-a |")  # fastest first
    assert "| scaling-s0 | scaling | fp32 | 0.8000 | 1.000 [0.950, 1.050] | 12.0 | over | yes |  |" in front
    assert front.endswith("MLflow run `r` in `sqlite:///m.db`: plot `report/mcu.png`, rows `report/mcu.json`.")


# ------------------------------------------------------------------------------ a real Prefect server

@pytest.fixture(scope="module")
def prefect_api(prefect_server: dict) -> Iterator[dict]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        yield prefect_server


def _citizen_context(root: Path):
    """A run context on SQLite MLflow (a new run) and a local store, training one tiny scaling member."""
    from podium.config import parse_config
    from podium.tasks.common import RunContext

    cfg = parse_config({
        "model_name": "citizen",
        "data": {"image_size": [16, 16], "batch_size": 32},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": str(root / "mlartifacts"),
                     "experiment": "citizen"},
        "store": {"uri": str(root / "store")},
        "anchors": [{"name": "a", "arch": {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}}],
        "methods": {"scaling": {"scales": [1], "train": {"epochs": 1, "max_steps": 3, "lr": 0.05,
                                                          "log_every_s": 1e-6}}},
        "runtime": {"cache_dir": str(root / "cache")}})
    run_id = RunContext(cfg=cfg, project_dir=str(root), run_id="", git_sha="t").registry.start_run("citizen", "citizen")
    return RunContext(cfg=cfg, project_dir=str(root), run_id=run_id, git_sha="t")


def _measured(name: str, method: str, acc: float, p50: float, device: str, flops: float):
    from podium.methods.base import Candidate
    from podium.tasks.profile import ExportedModel, MeasuredCandidate

    stats = LatencyStats(p50_ms=p50, p90_ms=1.2 * p50, mean_ms=p50, iqr_ms=0.1, runs=10, peak_mem_mb=12.0,
                         runtime="onnxruntime", threads=1, batch_size=1, p50_low_ms=0.95 * p50, p50_high_ms=1.05 * p50)
    cand = Candidate(name, method, {}, nn.Identity(), (8, 8), {"val_acc": acc, "flops": flops, "params": flops / 10,
                                                                "acts": flops / 7}, in_chans=1)
    return MeasuredCandidate(cand, ExportedModel(name, Path("x.onnx"), Path("x.safetensors"), (1, 8, 8)), (device,),
                             {device: stats})


@flow(name="citizen-report")
def citizen_flow(root: str) -> str:
    """The real training tasks (one tiny scaling member on the bundled digits) and the real report task
    on a pool of four measured scaling models and an anchor; returns the MLflow run id."""
    from podium.tasks.common import DatasetRef
    from podium.tasks.release import Outcome
    from podium.tasks.report import write_report
    from podium.tasks.train import train_methods

    ctx = _citizen_context(Path(root))
    ref = DatasetRef(root=str(REPO / "data" / "digits"), data_hash="citizen-digits")
    spaces, _keys, _cached, failed = train_methods(ctx, ref, [], None)
    assert set(spaces) == {"scaling"}, failed
    device = DeviceProfile(name="cpu_edge.1", runtime="onnxruntime", latency_budget_ms=2.0)
    pool = [_measured(f"scaling-s{i}", "scaling", 0.80 + 0.03 * i, 0.5 * (i + 1), device.name, (i + 1) * 1e6)
            for i in range(4)] + [_measured("anchor-a", "anchor", 0.9, 3.0, device.name, 9e6)]
    outcome = Outcome(device=device.name, winner="scaling-s2", version="1", alias_moved=True, reason="first champion",
                      chosen="most accurate within budget")
    write_report(ctx, [device], pool, [outcome])
    return ctx.run_id


@pytest.mark.integration
def test_a_runs_tasks_show_progress_winners_and_fronts_as_artifacts(prefect_api, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.artifacts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    updates: list[tuple[float, str]] = []
    real_update = prefect.artifacts.update_progress_artifact

    def spy(artifact_id, progress, description=None, client=None):
        updates.append((progress, description))
        return real_update(artifact_id, progress, description=description)

    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", spy)
    state = citizen_flow(str(tmp_path), return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=this_run)}
        task_runs = {t.name: t for t in client.read_task_runs(flow_run_filter=this_run)}
        again = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["citizen-winners"])))
    assert {"citizen-train-scaling", "citizen-winners", "citizen-front-cpu-edge-1"} <= set(artifacts), set(artifacts)
    assert [a.flow_run_id for a in again] == [run_id]  # the key is the model's, the same in every run

    # the training loop moved the bar step by step, then the task filled it
    progress = artifacts["citizen-train-scaling"]
    assert progress.type == "progress" and float(progress.data) == 100.0 and "trained in" in progress.description
    assert any("step 1/3" in (d or "") for _, d in updates) and any(p < 100 for p, _ in updates)

    (winner,) = json.loads(artifacts["citizen-winners"].data)
    assert winner["device"] == "cpu_edge.1" and winner["model"] == "scaling-s2" and winner["method"] == "scaling"
    assert winner["accuracy"] == "0.8600" and winner["p50 ms [95% interval]"] == "1.500 [1.425, 1.575]"
    assert winner["budget ms"] == "2" and "most accurate within budget" in winner["why"] and "v1" in winner["why"]
    front = artifacts["citizen-front-cpu-edge-1"].data
    assert "| scaling-s2 | scaling | fp32 | 0.8600 | 1.500 [1.425, 1.575] | 12.0 | within | yes | * |" in front
    assert "| anchor-a | anchor | fp32 | 0.9000 | 3.000 [2.850, 3.150] | 12.0 | over | yes |  |" in front
    assert "| scaling-s0 | scaling | fp32 | 0.8000 | 0.500" in front and "MLflow run `" in front

    # named per method, tagged with the stage and the method (the UI filters on both)
    assert {"training", "method:scaling"} <= set(task_runs["train-scaling"].tags)
    assert "report" in task_runs["report"].tags

    # four scaling models on the device: their correlation plot is drawn, but no r logged over so few
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow_run = mlflow.get_run(state.result())
    assert "report/scaling_runtime_cpu_edge.1.png" in {a.path for a in mlflow.list_artifacts(mlflow_run.info.run_id,
                                                                                              "report")}
    assert "scaling.train_wall_s" in mlflow_run.data.metrics
    assert not [k for k in mlflow_run.data.metrics if ".r_" in k]


@pytest.mark.integration
def test_podium_lines_reach_the_logs_of_a_run_a_worker_started(prefect_api, tmp_path: Path) -> None:
    """A worker imports Prefect before the flow's module (and so before ``podium``): the ``profile``
    flow's per-model lines, logged by ``podium.flows.device_profile``, must still reach its run's logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    from podium.files import sha256_file
    from podium.flows.device_profile import deploy_profiler
    from podium.infra.stack import stop_pid
    from podium.methods.runtimes import get_runtime
    from podium.registry.stores import open_store

    pool = "citizen-pool"
    create_pool(prefect_api, pool)
    deploy_profiler(pool, REPO)
    store = open_store(tmp_path / "store")
    rt = get_runtime("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    files = []
    for path in rt.artifact_files(rt.export(model.eval(), (1, 8, 8), tmp_path / "export")):
        store.put_file(f"profiling/citizen/{path.name}", path)
        files.append({"key": f"profiling/citizen/{path.name}", "name": path.name, "sha256": sha256_file(path)})
    device = DeviceProfile(name="citizen-edge", runtime="onnxruntime", threads=1, batch_size=1, work_pool=pool,
                           latency_budget_ms=100.0, **MEASUREMENT)
    models = [{"name": "tiny", "runtime": "onnxruntime", "main": rt.artifact_name, "files": files,
               "input_shape": [1, 8, 8]}]

    # the worker as an operator starts it: nothing of podium's in its environment
    env = {k: v for k, v in prefect_api["env"].items() if k != "PREFECT_LOGGING_EXTRA_LOGGERS"}
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env=env, cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        flow_run = run_deployment(name=f"profile/{pool}", timeout=240, poll_interval=1, parameters={
            "device": device.model_dump(mode="json"), "models": models, "store_uri": str(tmp_path / "store")})
        assert flow_run.state is not None and flow_run.state.is_completed(), f"{flow_run.state}\n{tail(worker_log)}"
        deadline, podium_lines = time.monotonic() + 20, []
        while not podium_lines and time.monotonic() < deadline:  # logs are sent in batches, after the state
            with get_client(sync_client=True) as client:
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            podium_lines = [log for log in logs if log.name.startswith("podium.")]
            time.sleep(0.5 if not podium_lines else 0)
    finally:
        stop_pid(worker.pid)
        worker.wait(timeout=10)
    names = sorted({log.name for log in logs})
    assert [log.message for log in podium_lines if log.message.startswith("tiny on citizen-edge: p50")], names
    assert len([log for log in podium_lines if log.message.startswith("tiny on citizen-edge")]) == 1  # once, not twice
    assert any(log.name.startswith("prefect.") for log in logs)
