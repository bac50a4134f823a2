"""A method's training on ``runtime.processes`` data-parallel processes started by ``torchrun``.

The task writes the job (context, dataset, anchors) to a temporary folder and runs
``python -m torch.distributed.run -m podium.tasks.distributed JOB OUT``; every process trains the method
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

from podium.errors import DistributedTrainingError
from podium.files import atomic_write_bytes
from podium.methods import distributed
from podium.methods.base import Anchor, CandidateSpace
from podium.methods.catalog import get_method
from podium.methods.checkpoint import training_env
from podium.methods.train import fit_method
from podium.tasks.common import DatasetRef, RunContext, load_data, training_env_for

log = logging.getLogger("podium.tasks.distributed")


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
        return cloudpickle.loads(out.read_bytes())


def main(job: Path, out: Path) -> None:
    device = distributed.init_from_env()
    ctx, ref, method, anchors, teacher, training_key = cloudpickle.loads(job.read_bytes())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s - %(message)s")
    data = load_data(ctx, ref)
    env, _checkpoints = training_env_for(ctx, training_key)
    with training_env(dataclasses.replace(env, device=device)):
        space = fit_method(get_method(method).method(ctx.cfg.method_config(method)), data, anchors, teacher)
    if distributed.is_primary():
        atomic_write_bytes(out, cloudpickle.dumps(space))
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
