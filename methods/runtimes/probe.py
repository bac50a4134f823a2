"""Fresh-process memory probe: ``python -m podium.methods.runtimes.probe '<json request>'``.

Imports the runtime's library, records resident memory, resets the kernel's high-water mark
(``/proc/self/clear_refs`` = 5), opens the artifact and runs one batch, then prints the growth of
the high-water mark as ``{"peak_mem_mb": ...}``. A fresh process is the only way to see what a
model costs: in a long-lived one, memory freed by earlier models is reused and the growth reads 0.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from podium.methods.runtimes import get_runtime

_KB = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.M)


def _status_mb() -> dict[str, float]:
    return {k: int(v) / 1024 for k, v in _KB.findall(Path("/proc/self/status").read_text())}


def reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(request: dict) -> float:
    runtime = get_runtime(request["runtime"])
    batch = np.random.default_rng(0).standard_normal((request["batch_size"], *request["input_shape"]),
                                                     dtype=np.float32)
    runtime.import_library()  # the library's own code and import-time data are not the model's cost
    baseline = _status_mb()["VmRSS"]
    if not reset_high_water_mark():
        raise SystemExit("cannot reset the resident high-water mark (/proc/self/clear_refs)")
    with runtime.open(Path(request["artifact"]), request["threads"]) as session:
        session.run(session.prepare(batch))
        peak = _status_mb()["VmHWM"]
    return max(0.0, peak - baseline)


if __name__ == "__main__":
    print(json.dumps({"peak_mem_mb": main(json.loads(sys.argv[1]))}))
