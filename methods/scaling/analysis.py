"""Runtime correlation, the paper's central analysis per device: latency vs flops, params and acts."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

METRICS = ("flops", "params", "acts")


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when undefined (fewer than 2 points or a constant series)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) < 2 or xa.std() == 0 or ya.std() == 0:
        return float("nan")
    return float(np.corrcoef(xa, ya)[0, 1])


def runtime_correlation(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pearson r of measured latency (``p50_ms``) vs flops, params and acts over the records.

    ``records``: ``{name, flops, params, acts, p50_ms}`` per model. Returns
    ``{"r_flops", "r_params", "r_acts", "n", "best"}`` (best: the metric with the highest r).
    """
    latency = [float(r["p50_ms"]) for r in records]
    out: dict[str, Any] = {f"r_{m}": pearson_r([float(r[m]) for r in records], latency) for m in METRICS}
    out["n"] = len(records)
    finite = {m: out[f"r_{m}"] for m in METRICS if not math.isnan(out[f"r_{m}"])}
    out["best"] = max(finite, key=finite.get) if finite else None
    return out
