"""methods.host: the glibc allocator tuning the training bench measures."""
from __future__ import annotations

import platform
import subprocess
import sys


def test_tune_allocator_returns_true_on_glibc_linux() -> None:
    # in a fresh process: the thresholds are process-wide and cannot be undone
    code = "from podium.methods.host import tune_allocator; r = tune_allocator(); print(type(r).__name__, r)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "bool"
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert out[1] == "True"
