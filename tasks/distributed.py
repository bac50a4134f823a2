"""A method's training on ``runtime.processes`` data-parallel processes started by ``torchrun``.

The task writes the job (context, dataset, anchors) to a temporary folder and runs
``python -m torch.distributed.run -m tasks.distributed JOB OUT``; every process trains the method
(see :mod:`methods.distributed`), the primary writes the trained space, and the task reads it back.
Checkpoints work as in one process: the primary saves them, every process resumes from them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import cloudpickle

from methods import distributed
from methods.base import Anchor, CandidateSpace
from methods.catalog import method_class
from methods.checkpoint import training_env
from tasks.common import DatasetRef, RunContext, load_data, training_env_for

log = logging.getLogger("podium.tasks.distributed")


class DistributedTrainingError(RuntimeError):
    """The torchrun job failed (one line, with the last line it printed)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_distributed(ctx: RunContext, ref: DatasetRef, method: str, anchors: list[Anchor], teacher: Anchor | None,
                    training_key: str) -> CandidateSpace:
    processes = ctx.cfg.runtime.processes
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.pkl", Path(tmp) / "space.pkl"
        job.write_bytes(cloudpickle.dumps((ctx, ref, method, anchors, teacher, training_key)))
        threads = max(1, (os.cpu_count() or 1) // processes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PODIUM_DEVICE": ctx.cfg.runtime.device,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "tasks.distributed",
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
        return cloudpickle.loads(out.read_bytes())


def main(job: Path, out: Path) -> None:
    device = distributed.init_from_env()
    ctx, ref, method, anchors, teacher, training_key = cloudpickle.loads(job.read_bytes())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s - %(message)s")
    data = load_data(ctx, ref)
    env, _checkpoints = training_env_for(ctx, training_key)
    with training_env(dataclasses.replace(env, device=device)):
        space = method_class(method)(ctx.cfg.method_config(method)).fit(data, anchors, teacher)
    if distributed.is_primary():
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(cloudpickle.dumps(space))
        tmp.replace(out)
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
