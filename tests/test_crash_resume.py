"""Crash safety end to end: `podium retrain` killed with SIGKILL in the middle of a method's training,
then started again, resumes that training from its last checkpoint in the store, does not redo
finished work (the anchors), and promotes valid models."""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from podium.registry.release import fetch_release
from podium.registry.stores import open_store
from tests.conftest import onnx_logits
from tests.flow_helpers import BUCKET, REPO, write_config

pytestmark = pytest.mark.integration
PODIUM = str(Path(sys.executable).parent / "podium")
METHOD_STEPS = 150  # long enough to be killed in the middle (~15 s on 2 cores)
KILL_AT = re.compile(r"self-distill: checkpoint at step ([3-9]\d|\d{3,})/")  # the first checkpoint past step 30


def run_podium(config: Path, env: dict[str, str], kill_on: re.Pattern | None = None,
               timeout_s: float = 300) -> tuple[int, str]:
    """Run `podium retrain`; with ``kill_on``, SIGKILL its whole process group at the first matching line."""
    proc = subprocess.Popen([PODIUM, "retrain", "--config", str(config), "--project-dir", str(REPO)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=1.0):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if kill_on is not None and kill_on.search(line):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("podium retrain did not finish in time:\n" + "".join(lines[-40:]))
        return proc.wait(timeout=60), "".join(lines)
    finally:
        proc.stdout.close()


@pytest.fixture
def project(services, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    methods = {"self_distill": {"train_baseline": False, "train": {"epochs": 50, "max_steps": METHOD_STEPS,
                                                                    "lr": 0.05}}}
    config = write_config(services, tmp_path / "config.yaml", methods=methods,
                          runtime={"cache_dir": str(tmp_path / "cache"), "max_workers": 1,
                                   "checkpoint_every_s": 0.5})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        env[key] = os.environ[key]
    return config, env


def test_killed_run_resumes_its_training_and_promotes_valid_models(project, services) -> None:
    config, env = project
    code, first = run_podium(config, env, kill_on=KILL_AT)
    assert code == -signal.SIGKILL, first[-3000:]
    killed_at = int(re.findall(r"self-distill: checkpoint at step (\d+)", first)[-1])
    assert 0 < killed_at < METHOD_STEPS

    code, second = run_podium(config, env)
    assert code == 0, second[-3000:]
    resumed = re.search(rf"self-distill: resumed from checkpoint at step (\d+)/{METHOD_STEPS}", second)
    assert resumed, second[-3000:]
    assert int(resumed.group(1)) >= killed_at  # a later checkpoint may have landed before the kill
    assert "anchor resnet-tiny: epoch" not in second  # anchors finished before the kill: not trained again
    assert re.search(rf"self-distill: epoch [\d.]+ step {METHOD_STEPS}/{METHOD_STEPS}", second)

    store = open_store(f"s3://{BUCKET}/models", services["endpoint"])
    assert store.list("_checkpoints/self_distill-") == []  # a finished training leaves no checkpoints behind
    images = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    for device in ("cpu-1t", "cpu-onnx"):
        dest = config.parent / "fetched" / device
        fetch_release(store, "digits-classifier", device, dest)
        logits = onnx_logits(dest / "model.onnx", images)
        assert logits.shape == (4, 10) and np.isfinite(logits).all()
