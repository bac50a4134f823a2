"""A method's training on ``runtime.processes`` data-parallel processes started by ``torchrun``.

The task writes the job to a temporary folder as data (``job.json``: the config, dataset and
anchors' architectures; ``anchors.safetensors``: their weights) and runs
``python -m torch.distributed.run -m podium.tasks.distributed JOB OUT``; every process rebuilds the
anchors and trains the method (see :mod:`methods.distributed`), the primary saves the trained space
with :func:`~podium.methods.space_store.save_space`, and the task loads it back, verified. Nothing
crosses the process boundary as a pickle. Checkpoints work as in one process: the primary saves them,
every process resumes from them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from podium.config import parse_config
from podium.errors import DistributedTrainingError
from podium.files import atomic_write_text
from podium.methods import distributed, families
from podium.methods.base import Anchor, CandidateSpace
from podium.methods.catalog import get_method
from podium.methods.checkpoint import training_env
from podium.methods.space_store import load_space, save_space
from podium.methods.train import fit_method
from podium.tasks.common import DatasetRef, RunContext, load_data, training_env_for

log = logging.getLogger("podium.tasks.distributed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_job(folder: Path, ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor],
               teacher: Anchor | None, training_key: str) -> Path:
    """The job as data: JSON for what it is, safetensors for the anchors' and teacher's weights."""
    models = [*anchors, *([teacher] if teacher else [])]
    unbuildable = [a.name for a in models if not a.arch]
    if unbuildable:
        raise DistributedTrainingError(f"{method}: anchors {', '.join(unbuildable)} record no architecture to "
                                       "rebuild them in the torchrun processes")
    save_file({f"{i}/{k}": v.detach().cpu().contiguous().clone() for i, a in enumerate(models)
               for k, v in a.model.state_dict().items()}, str(folder / "anchors.safetensors"))
    describe = [{"name": a.name, "source": a.source, "arch": a.arch} for a in models]
    job = {"cfg": ctx.cfg.model_dump(mode="json", exclude_unset=True), "project_dir": ctx.project_dir, "run_id": ctx.run_id,
           "git_sha": ctx.git_sha, "tracking_uri": ctx.tracking_uri, "ref": dataclasses.asdict(ref),
           "method": method, "training_key": training_key, "anchors": describe[:len(anchors)],
           "teacher": describe[len(anchors)] if teacher else None}
    atomic_write_text(folder / "job.json", json.dumps(job))
    return folder / "job.json"


def _read_job(path: Path) -> tuple[RunContext, DatasetRef, str, list[Anchor], Anchor | None, str]:
    job = json.loads(path.read_text())
    ctx = RunContext(parse_config(job["cfg"]), job["project_dir"], job["run_id"], job["git_sha"], job["tracking_uri"])
    ref = DatasetRef(**{**job["ref"], "classes": tuple(job["ref"]["classes"]) if job["ref"]["classes"] else None})
    weights = load_file(str(path.parent / "anchors.safetensors"))
    data = load_data(ctx, ref)

    def rebuild(i: int, spec: dict) -> Anchor:
        model = families.build(spec["arch"], data.num_classes, data.input_spec.channels)
        prefix = f"{i}/"
        model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
        return Anchor(spec["name"], model.eval(), spec["source"], spec["arch"])

    anchors = [rebuild(i, spec) for i, spec in enumerate(job["anchors"])]
    teacher = rebuild(len(anchors), job["teacher"]) if job["teacher"] else None
    return ctx, ref, job["method"], anchors, teacher, job["training_key"]


def fit_distributed(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor], teacher: Anchor | None,
                    training_key: str) -> CandidateSpace:
    processes = ctx.cfg.runtime.processes
    with tempfile.TemporaryDirectory() as tmp:
        job, out = _write_job(Path(tmp), ctx, ref, method, anchors, teacher, training_key), Path(tmp) / "space"
        threads = max(1, (os.cpu_count() or 1) // processes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PODIUM_DEVICE": ctx.cfg.runtime.device}
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "podium.tasks.distributed",
                   str(job), str(out)]
        log.info("%s: training on %d data-parallel processes (torchrun)", method, processes)
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        for line in proc.stderr.splitlines():
            if "podium" in line or "error" in line.lower():
                log.info("[torchrun] %s", line)
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise DistributedTrainingError(f"{method}: torchrun with {processes} processes failed "
                                           f"(exit {proc.returncode}): {last}")
        return load_space(out, load_data(ctx, ref), training_key)


def main(job: Path, out: Path) -> None:
    device = distributed.init_from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s - %(message)s")
    ctx, ref, method, anchors, teacher, training_key = _read_job(job)
    data = load_data(ctx, ref)
    env, _checkpoints = training_env_for(ctx, training_key)
    with training_env(dataclasses.replace(env, device=device)):
        space = fit_method(get_method(method).method(ctx.cfg.method_config(method)), data, anchors, teacher)
    if distributed.is_primary():
        save_space(space, out, training_key)
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
