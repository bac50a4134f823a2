"""Every available runtime runs its own artifact like PyTorch (FP32), builds every precision it lists,
measures a real peak memory, and keeps INT8 accuracy on the digits within a stated bound."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from podium.methods.families import build
from podium.methods.runtimes import RUNTIMES, available_runtimes, get_runtime

# ExecuTorch's C++ runtime has one process-wide XNNPACK threadpool, resized "unsafely": its cases run in
# a fresh interpreter of their own (test_executorch_in_a_fresh_process). (The SIGSEGV that once killed the
# suite's process around here was OpenVINO's signal stack: see test_an_openvino_session_freed_by_another_...)
ISOLATED = os.environ.get("PODIUM_TEST_ISOLATED") == "executorch"
RUNTIMES_HERE = ["executorch"] if ISOLATED else [n for n in available_runtimes() if n != "executorch"]

TINY = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
SHAPE = (1, 32, 32)
FP32_TOLERANCE = 1e-4  # max |logit difference| against eager PyTorch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build(TINY, 10, 1).eval()


@pytest.fixture(scope="module")
def fp32_artifacts(tiny, tmp_path_factory):
    """Each runtime's FP32 export, made once (ExecuTorch's lowering alone takes 15-35 s)."""
    folder = tmp_path_factory.mktemp("fp32")
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = get_runtime(name).export(tiny, SHAPE, folder / name)
        return made[name]

    return get


def test_the_cpu_runtimes_are_installed_here():
    assert {"torch", "onnxruntime", "openvino", "executorch"} <= set(available_runtimes())


@pytest.mark.skipif(ISOLATED, reason="this is the isolated run")
def test_executorch_in_a_fresh_process():
    """The parametrized runtime tests above, for ExecuTorch, in an interpreter of their own."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "executorch and not fresh_process"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PODIUM_TEST_ISOLATED": "executorch"})
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("3 passed"), \
        done.stdout[-3000:] + done.stderr[-2000:]


def _calibration(n: int = 2) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal((8, *SHAPE), dtype=np.float32) for i in range(n)]


@pytest.mark.parametrize("name", RUNTIMES_HERE)
def test_fp32_artifact_matches_pytorch(name, tiny, fp32_artifacts):
    runtime = get_runtime(name)
    x = np.random.default_rng(7).standard_normal((3, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = tiny(torch.from_numpy(x)).numpy()
    artifact = fp32_artifacts(name)
    assert artifact.name == runtime.artifact_name and all(p.exists() for p in runtime.artifact_files(artifact))
    for batch in (x, x[:1]):  # the batch axis is dynamic
        with runtime.open(artifact, threads=1) as session:
            got = session.predict(batch)
        assert got.dtype == np.float32 and np.abs(got - expected[: len(batch)]).max() < FP32_TOLERANCE, name


@pytest.mark.parametrize("name", RUNTIMES_HERE)
def test_peak_memory_is_measured(name, fp32_artifacts):
    """Model load + first batch costs memory: a real positive number, larger for a larger batch's activations."""
    runtime = get_runtime(name)
    artifact = fp32_artifacts(name)
    small = runtime.peak_memory_mb(artifact, SHAPE, threads=1, batch_size=1)
    large = runtime.peak_memory_mb(artifact, SHAPE, threads=1, batch_size=256)
    assert 0 < small < 2048 and large > small, (name, small, large)


@pytest.mark.parametrize("name", [n for n in RUNTIMES_HERE if "int8" in RUNTIMES[n].precisions])
def test_int8_artifact_is_quantised_and_close(name, tiny, fp32_artifacts, tmp_path):
    runtime = get_runtime(name)
    fp32 = fp32_artifacts(name)
    int8 = runtime.export(tiny, SHAPE, tmp_path / "int8", "int8", _calibration())
    size = lambda a: sum(p.stat().st_size for p in runtime.artifact_files(a))  # noqa: E731
    assert size(int8) < 0.6 * size(fp32), name  # INT8 weights: about a quarter of FP32's bytes
    x = _calibration(1)[0]
    with runtime.open(fp32, 1) as a, runtime.open(int8, 1) as b:
        ref, got = a.predict(x), b.predict(x)
    assert not np.array_equal(ref, got) and np.abs(ref - got).max() < 0.25 * np.abs(ref).max(), name


def test_int8_needs_calibration_and_unsupported_precisions_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="int8 export needs calibration batches"):
        get_runtime("onnxruntime").export(tiny, SHAPE, tmp_path, "int8")
    with pytest.raises(ValueError, match="runtime 'torch' cannot build int8 here"):
        get_runtime("torch").export(tiny, SHAPE, tmp_path, "int8", _calibration())


def test_a_pt2_with_pickled_entries_is_refused(tiny, tmp_path):
    """torch.export.load falls back to full unpickling; Podium checks the archive first."""
    import zipfile

    from podium.methods.runtimes.eager import check_pt2

    artifact = get_runtime("torch").export(tiny, SHAPE, tmp_path)
    check_pt2(artifact)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import io
    import pickle

    planted = tmp_path / "planted.pt2"
    with zipfile.ZipFile(artifact) as src, zipfile.ZipFile(planted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save({"x": Evil()}, buffer, pickle_module=pickle)
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="is not plain tensors"):
        get_runtime("torch").open(planted, threads=1)


def test_gpu_runtimes_say_they_are_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for name in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        assert not get_runtime(name).available()


OPENVINO_FREED_ELSEWHERE = r"""
import gc, os, signal, sys, tempfile, threading
from pathlib import Path
import numpy as np
from podium.methods.families import build
from podium.methods.runtimes import get_runtime
rt = get_runtime("openvino")
artifact = rt.export(build({TINY!r}, 10, 1).eval(), {SHAPE!r}, Path(tempfile.mkdtemp()))
held = {{"session": rt.open(artifact, 1)}}
held["session"].predict(np.zeros((1, *{SHAPE!r}), np.float32))
freer = threading.Thread(target=held.clear)  # never closed: the last reference goes in another thread
freer.start(); freer.join(); gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive")
"""


@pytest.mark.skipif("openvino" not in RUNTIMES_HERE, reason="openvino is not installed here")
def test_an_openvino_session_freed_by_another_thread_leaves_signals_deliverable():
    """OpenVINO's CPU plugin swaps in its own alternate signal stack and unmaps it when the model is
    freed; the opening thread's next signal then killed the whole test process (SIGSEGV)."""
    script = OPENVINO_FREED_ELSEWHERE.format(TINY=TINY, SHAPE=SHAPE)
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["handled", "alive"], \
        (done.returncode, done.stderr[-2000:])


ORT_SESSIONS_IN_ONE_PROCESS = """
import sys, numpy as np
from podium.methods.runtimes import get_runtime
def threads():
    return int(next(l for l in open("/proc/self/status") if l.startswith("Threads")).split()[1])
rt = get_runtime("onnxruntime")
rt.import_library()
rt.share_threads({shared})
before = threads()
sessions = [rt.open({path!r}, 2) for _ in range(6)]
batch = np.random.default_rng(0).standard_normal((2, *{shape}), dtype=np.float32)
print(threads() - before, float(np.abs(sessions[0].predict(batch) - sessions[-1].predict(batch)).max()))
"""


@pytest.mark.skipif("onnxruntime" not in RUNTIMES_HERE, reason="onnxruntime is not installed here")
@pytest.mark.parametrize("shared, new_threads", [(2, 0), (1, 6)])
def test_a_measuring_process_runs_its_onnxruntime_sessions_on_one_pool(shared, new_threads, fp32_artifacts):
    """The isolated measuring process holds hundreds of sessions: on 2 threads they share one spinning
    pool (each session's own non-spinning pool measured 1.8-2.3x slower than a deployed session), so
    opening sessions starts no threads; with a pool of 1 there is nothing to share, each session keeps
    its own, and six 2-thread sessions then start a pool thread each."""
    script = ORT_SESSIONS_IN_ONE_PROCESS.format(shared=shared, path=str(fp32_artifacts("onnxruntime")), shape=SHAPE)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    started, difference = done.stdout.split()
    assert int(started) == new_threads and float(difference) == 0.0
