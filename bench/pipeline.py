"""Pipeline performance: orchestration overhead, warm re-runs, training-loop throughput, `make demo`.

Everything runs in a scratch copy of the checkout (the tracked and untracked-not-ignored files, a
fresh ``git init``, a private ``PREFECT_HOME``), so this checkout's ``.podium/``, ``mlflow.db``,
``mlartifacts/``, ``store/`` and ``~/.prefect`` are never touched.

1. ``retrain`` in this process (``flows.retrain.run_retrain``) on the demo config, cold (empty caches,
   empty MLflow, no dataset yet): the Prefect API a retrain starts for itself (``flows.ephemeral_api``)
   is started first, once for both runs, and timed on its own, then the flow. Its task runs are read
   back from the Prefect API; **overhead** is the flow's wall time minus the length of the union of the
   task-run intervals (tasks overlap, so intervals are merged, not summed): what orchestration and the
   flow body cost beyond the tasks.
2. The same flow again, unchanged data and config (warm): its wall time relative to the cold run's.
3. ``methods.train.fit`` against a plain PyTorch loop written here (same model, data tensors, batch,
   SGD with the same parameter groups, cosine schedule, and the threads each training gets in the flow;
   ``--threads 1,2`` for others) in ``--repeats`` pairs, the order alternating: the median per-pair ratio
   with its 95 % interval; "ok" only when the whole interval clears the goal, "undecided" when it straddles.
4. ``make demo`` in another scratch copy, cold and then once more (warm), each a new process as a user
   runs it (imports, API start and all); ``--no-demo`` skips it. Per run: wall, CPU-seconds per
   wall-second of the whole process tree (the measuring subprocesses included), the overhead as the
   user sees it (the make's wall minus the union of the task runs: imports, API start, flow body and
   exit) next to the in-flow figure, and each stage's wall (union of its task runs, read back from the
   run's Prefect database) with its CPU-s per wall-s (psutil samples of the process tree). The warm
   run's wall over the cold one's is the "a warm run costs what changed" figure.

    python bench/pipeline.py [--config configs/demo.yaml] [--no-demo] [--profile DIR]

``--profile DIR`` writes a pyinstrument profile (text, HTML, session) of each flow run (main thread: the
flow body and the tasks it calls directly; submitted trainings run in pool threads) when pyinstrument is
installed (it is not a dependency: ``pip install pyinstrument``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OVERHEAD_MAX, WARM_MAX, THROUGHPUT_MIN, DEMO_MAX_S = 0.05, 0.10, 0.95, 600.0


# ---------------------------------------------------------------------------------------- scratch project


def scratch_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-not-ignored files (mtimes kept) plus a fresh git repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=dest, check=True)
    return dest


# ---------------------------------------------------------------------------------------- flow timing


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end] intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def read_task_runs(flow_name: str, started_after: float) -> tuple[object, list]:
    """The newest run of ``flow_name`` started after ``started_after`` (epoch s) and its task runs, once
    every task run has a final state (task-run states reach the API as events, slightly after the fact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        if flow_run.start_time is None or flow_run.start_time.timestamp() < started_after - 1:
            raise RuntimeError(f"no run of {flow_name} after the bench started it")
        task_runs, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            if task_runs and all(t.state is not None and t.state.is_final() for t in task_runs):
                break
            time.sleep(0.5)
        return flow_run, task_runs


def task_interval(task_run) -> tuple[float, float] | None:
    """(start, end) epoch seconds of a task run's own execution; a cache hit has no Running state, so
    its interval is from its creation to its final state."""
    end = task_run.end_time or (task_run.state.timestamp if task_run.state else None)
    start = task_run.start_time or task_run.created
    if start is None or end is None:
        return None
    return start.timestamp(), end.timestamp()


def timed_flow(config: str, project: Path, profile_to: Path | None, label: str) -> dict:
    from podium.flows.retrain import run_retrain

    profiler = None
    if profile_to is not None:
        try:
            from pyinstrument import Profiler
        except ImportError:
            print("pyinstrument not installed: no profile", file=sys.stderr)
        else:
            profiler = Profiler(interval=0.005)
            profiler.start()
    began = time.time()
    start = time.perf_counter()
    result = run_retrain(config, str(project))
    wall = time.perf_counter() - start
    if profiler is not None:
        profiler.stop()
        profile_to.mkdir(parents=True, exist_ok=True)
        (profile_to / f"{label}.txt").write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        (profile_to / f"{label}.html").write_text(profiler.output_html())
        profiler.last_session.save(str(profile_to / f"{label}.pyisession"))  # pyinstrument --load=...
    flow_run, task_runs = read_task_runs("retrain", began)
    intervals = [iv for iv in map(task_interval, task_runs) if iv is not None]
    tasks = sorted(((t.name, t.state.name if t.state else "?", iv[1] - iv[0])
                    for t, iv in zip(task_runs, map(task_interval, task_runs)) if iv is not None),
                   key=lambda row: -row[2])
    union = union_length(intervals)
    return {"wall": wall, "union": union, "overhead": wall - union, "tasks": tasks, "result": result,
            "api_wall": (flow_run.end_time - flow_run.start_time).total_seconds()
            if flow_run.end_time and flow_run.start_time else math.nan}


# ---------------------------------------------------------------------------------------- training loop


def plain_loop(model, loader, lr: float, momentum: float, weight_decay: float, steps: int) -> float:
    """A textbook PyTorch loop: SGD (nesterov), no decay on 1-D params, cosine lr per step, in the memory
    format ``fit`` trains the model in (channels-last for convolutional networks). images/s."""
    import torch
    import torch.nn.functional as F

    from podium.methods.train import TrainConfig, uses_channels_last

    fmt = torch.channels_last if uses_channels_last(TrainConfig().channels_last, model) else torch.contiguous_format
    model.to(memory_format=fmt)

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=True)
    model.train()
    step, seen = 0, 0
    start = time.perf_counter()
    while step < steps:
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(images.contiguous(memory_format=fmt)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += images.shape[0]
            if step >= steps:
                break
    loss.item()
    return seen / (time.perf_counter() - start)


def throughput(arch: dict, epochs: float, lr: float, repeats: int, threads: int
               ) -> tuple[float, float, tuple[float, float], int]:
    """``methods.train.fit`` against :func:`plain_loop` in ``repeats`` pairs, the order alternating within
    each pair so drift hits both alike: the median of the per-pair ratios fit/plain, its 95 % interval
    (order statistics, ``profiling.median_interval``; the extremes under 6 pairs), the median plain
    images/s, and the steps."""
    import statistics

    import torch

    from podium.methods.families import build
    from podium.methods.profiling import median_interval
    from podium.methods.train import TrainConfig, cross_entropy_loss, fit, total_steps
    from tests.conftest import digits_bundle

    torch.set_num_threads(threads)
    data = digits_bundle()
    cfg = TrainConfig(epochs=epochs, lr=lr, log_every_s=1e9)
    steps = total_steps(cfg, len(data.train))

    def podium_rate() -> float:
        torch.manual_seed(0)
        model = build(arch, data.num_classes, data.input_spec.channels)
        return fit(model, data.train, cross_entropy_loss(model), cfg, name="bench").images_per_s

    def plain_rate() -> float:
        torch.manual_seed(0)
        model = build(arch, data.num_classes, data.input_spec.channels)
        return plain_loop(model, data.train, cfg.lr, cfg.momentum, cfg.weight_decay, steps)

    ratios, plains = [], []
    for pair in range(repeats):
        if pair % 2 == 0:
            fitted, plain = podium_rate(), plain_rate()
        else:
            plain = plain_rate()
            fitted = podium_rate()
        ratios.append(fitted / plain)
        plains.append(plain)
    return statistics.median(ratios), statistics.median(plains), median_interval(ratios), steps


# ---------------------------------------------------------------------------------------- make demo

# the flow's stages, by task-run name prefix, in the order the flow runs them
STAGES = (("data (version, validate, push)", ("version-dataset", "validate-dataset", "push-dataset")),
          ("anchors", ("acquire-",)), ("trainings", ("train-",)), ("search (offers, OFA latency table)", ("offer-",)),
          ("profiling", ("profile-",)), ("precisions", ("derive-precisions",)), ("promotion, report", ("promote-", "report")))


class CpuSampler:
    """CPU-seconds used so far by a process and all its descendants (the ended ones too, once reaped),
    sampled every ``every_s`` in a thread: CPU-s per wall-s of any interval of the run."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        import threading

        import psutil

        self.root, self.every_s, self.samples = psutil.Process(pid), every_s, [(time.time(), 0.0)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _total(self) -> float:
        import psutil

        total = 0.0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:  # ended between the listing and the read: its time reaches its parent
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            try:
                self.samples.append((time.time(), self._total()))
            except psutil.Error:  # the root ended
                return

    def stop(self, final_cpu_s: float | None = None) -> None:
        self._stop.set()
        self._thread.join()
        if final_cpu_s is not None:  # the reaped total (resource.RUSAGE_CHILDREN), sharper than the last sample
            self.samples.append((time.time(), final_cpu_s))

    def cpu_between(self, start: float, end: float) -> float:
        import numpy as np

        times, cpus = np.array(self.samples).T
        return float(np.interp(end, times, cpus) - np.interp(start, times, cpus))


TASK_RUNS_OF_LAST_RETRAIN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bench.pipeline import read_task_runs, task_interval
flow_run, task_runs = read_task_runs("retrain", float(sys.argv[2]))
print(json.dumps({"flow": [flow_run.start_time.timestamp(), flow_run.end_time.timestamp()],
                  "tasks": [[t.name, *iv] for t in task_runs if (iv := task_interval(t)) is not None]}))
"""


def demo_stages(env: dict, began: float) -> dict:
    """The flow run and task-run intervals of the retrain a ``make demo`` ran, read back from its Prefect
    database (``env``'s PREFECT_HOME) by a new process: the ephemeral API that served it is gone."""
    out = subprocess.run([sys.executable, "-c", TASK_RUNS_OF_LAST_RETRAIN, str(REPO), str(began)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_make_demo(workdir: Path, times: int = 2) -> list[dict]:
    """``make demo`` ``times`` times in one fresh scratch copy (the first cold, then warm: every process
    pays its imports and the API start), the venv linked in (``-o``: never rebuild the shared venv): per
    run its wall and CPU seconds, and each stage's wall (union of its task runs) and CPU-s per wall-s."""
    import resource

    project = scratch_copy(workdir / "demo")
    (project / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    env["PREFECT_HOME"] = str(workdir / "demo-prefect-home")
    out = []
    for _ in range(times):
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        began, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(["make", "-o", ".venv/bin/podium", "demo"], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = CpuSampler(proc.pid)
        log, _ = proc.communicate()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - reaped.ru_utime - reaped.ru_stime
        sampler.stop(final_cpu_s=cpu)
        run = {"wall": wall, "cpu": cpu, "rc": proc.returncode, "load": load_average()}
        (workdir / f"make-demo-{len(out)}.log").write_text(log)  # kept with --keep: per-device timings
        if proc.returncode != 0:
            print(log[-3000:], file=sys.stderr)
            out.append(run)
            break
        recorded = demo_stages(env, began)
        if recorded:
            tasks = recorded["tasks"]
            run["in_flow"] = recorded["flow"][1] - recorded["flow"][0]
            run["union"] = union_length([(a, b) for _, a, b in tasks])
            run["stages"] = []
            for label, prefixes in STAGES:
                intervals = [(a, b) for name, a, b in tasks if name.startswith(prefixes)]
                if intervals:
                    first, last = min(a for a, _ in intervals), max(b for _, b in intervals)
                    run["stages"].append((label, union_length(intervals), sampler.cpu_between(first, last)
                                          / max(last - first, 1e-9)))
        out.append(run)
    return out


# ---------------------------------------------------------------------------------------- main


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="relative to the repository")
    parser.add_argument("--no-demo", action="store_true", help="skip timing `make demo` in a subprocess")
    parser.add_argument("--no-flow", action="store_true", help="skip the cold/warm flow runs")
    parser.add_argument("--train-epochs", type=float, default=2.0, help="epochs per throughput measurement")
    parser.add_argument("--repeats", type=int, default=6, help="paired fit/plain measurements (6+ for a 95 % interval)")
    parser.add_argument("--threads", default="", help="torch threads for the throughput rows, e.g. 1,2 (default: "
                        "what each training gets in the flow, cores / runtime.max_workers)")
    parser.add_argument("--profile", type=Path, default=None, help="write pyinstrument profiles of the flow runs here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    rows: list[tuple[str, str, str, str]] = []  # (measure, value, target, ok)
    workdir = Path(tempfile.mkdtemp(prefix="podium-bench-pipeline-"))
    loads = [load_average()]
    cleanup = contextlib.ExitStack()  # the in-process runs' API
    try:
        if not args.no_flow:
            project = scratch_copy(workdir / "project")
            os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")  # before prefect is imported
            os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
            os.chdir(project)  # the config's relative paths (sqlite:///mlflow.db, store) resolve here
            start = time.perf_counter()
            import podium.flows.retrain  # noqa: F401  (torch, prefect, mlflow, timm, ...)
            imports = time.perf_counter() - start
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from podium.flows.ephemeral_api import EphemeralAPI

            start = time.perf_counter()  # the API a retrain starts for itself, here once for both runs
            api = EphemeralAPI().start()
            cleanup.callback(api.stop)
            api.wait_ready()
            api_start = time.perf_counter() - start
            cleanup.enter_context(temporary_settings(updates={PREFECT_API_URL: api.api_url}))

            # The flow body's first act is opening the MLflow store; on a new SQLite DB that runs MLflow's
            # schema migrations (a one-off per tracking DB, none with an MLflow server). Timed as it happens.
            from podium.registry.mlflow_registry import ModelRegistry

            opened: list[float] = []
            real_init = ModelRegistry.__init__

            def timed_init(self, *a, **k):
                start = time.perf_counter()
                real_init(self, *a, **k)
                opened.append(time.perf_counter() - start)

            ModelRegistry.__init__ = timed_init
            try:
                cold = timed_flow(args.config, project, args.profile, "cold")
            finally:
                ModelRegistry.__init__ = real_init
            mlflow_schema = opened[0] if opened else math.nan  # the flow body's, before any task
            loads.append(load_average())
            warm = timed_flow(args.config, project, args.profile, "warm")
            loads.append(load_average())
            print("\ntask runs, seconds (cold, then warm):")
            for name, state, seconds in cold["tasks"]:
                print(f"  {name:<34} {state:<10} {seconds:8.2f}")
            print("  --")
            for name, state, seconds in warm["tasks"]:
                print(f"  {name:<34} {state:<10} {seconds:8.2f}")
            rows += [
                ("imports (flows.retrain)", f"{imports:.1f} s", "reported", ""),
                ("the run's own Prefect API start", f"{api_start:.1f} s", "reported", ""),
            ]
            for label, run in (("cold", cold), ("warm", warm)):
                share = run["overhead"] / run["wall"]
                rows += [(f"{label} flow wall (tasks union)", f"{run['wall']:.1f} s ({run['union']:.1f} s)", "", ""),
                         (f"{label} orchestration overhead", f"{run['overhead']:.2f} s = {share:.1%}",
                          f"<= {OVERHEAD_MAX:.0%}" if label == "cold" else "reported",
                          ("ok" if share <= OVERHEAD_MAX else "FAIL") if label == "cold" else "")]
                if label == "cold":
                    rows.append(("  of which: open MLflow store, new SQLite DB",
                                 f"{mlflow_schema:.2f} s (one-off per DB)", "reported", ""))
            ratio = warm["wall"] / cold["wall"]
            cached = ", ".join(warm["result"].cached_methods) or "none"
            rows.append(("warm / cold wall", f"{ratio:.1%} (cached: {cached})", f"<= {WARM_MAX:.0%}",
                         "ok" if ratio <= WARM_MAX else "FAIL"))


        from podium.config import load_config

        cfg = load_config(REPO / args.config)
        anchor = cfg.anchors[-1]
        threads = max(1, (os.cpu_count() or 1) // cfg.runtime.max_workers)
        for n in sorted({int(t) for t in args.threads.split(",") if t.strip()} or {threads}):
            share, plain_rate, (low, high), steps = throughput(anchor.arch, args.train_epochs, anchor.train.lr,
                                                               args.repeats, n)
            verdict = "ok" if low >= THROUGHPUT_MIN else ("FAIL" if high < THROUGHPUT_MIN else "undecided")
            rows.append((f"fit / plain loop, {anchor.name}, {n} thr, {args.repeats} pairs",
                         f"{share:.3f} [{low:.3f}, {high:.3f}] (plain {plain_rate:.0f} img/s)",
                         f">= {THROUGHPUT_MIN}", verdict))
        loads.append(load_average())

        if not args.no_demo:
            demos = time_make_demo(workdir)
            for i, run in enumerate(demos):
                kind = "cold" if i == 0 else "warm"
                rows.append((f"make demo, {kind} (new process)",
                             f"{run['wall']:.0f} s, {run['cpu'] / run['wall']:.2f} CPU-s/s, load {run['load']}"
                             + ("" if run["rc"] == 0 else f" (exit {run['rc']})"),
                             f"< {DEMO_MAX_S:.0f} s" if i == 0 else "reported",
                             ("ok" if run["rc"] == 0 and run["wall"] < DEMO_MAX_S else "FAIL") if i == 0 else ""))
                if "union" in run:
                    beyond = run["wall"] - run["union"]
                    rows.append((f"  overhead as the user sees it ({kind})",
                                 f"{beyond:.1f} s = {beyond / run['wall']:.1%} (in-flow: "
                                 f"{run['in_flow'] - run['union']:.1f} s = {(run['in_flow'] - run['union']) / run['in_flow']:.1%})",
                                 "reported", ""))
                    for label, seconds, cores in run["stages"]:
                        rows.append((f"  {label}", f"{seconds:.1f} s, {cores:.2f} CPU-s/s", "reported", ""))
            if len(demos) == 2 and all(r["rc"] == 0 for r in demos):
                ratio = demos[1]["wall"] / demos[0]["wall"]
                rows.append(("make demo warm / cold", f"{ratio:.1%}", f"<= {WARM_MAX:.0%}",
                             "ok" if ratio <= WARM_MAX else "FAIL"))
            loads.append(load_average())
    finally:
        cleanup.close()
        if args.keep:
            print(f"scratch kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\npipeline bench: {args.config}, {os.cpu_count()} CPU cores; load average (1/5/15 min) at start, "
          f"after cold, after warm, after throughput, after demo: {' | '.join(loads)}")
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'value':<{vwidth}}  {'target':<8}  ok")
    print("-" * (width + vwidth + 16))
    for measure, value, target, ok in rows:
        print(f"{measure:<{width}}  {value:<{vwidth}}  {target:<8}  {ok}")


if __name__ == "__main__":
    main()
