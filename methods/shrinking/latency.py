"""Per-device latency lookup table: layer configurations measured on the device's runtime."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from podium.methods.profiling import DeviceProfile, measure
from podium.methods.shrinking.blocks import MBConv
from podium.methods.shrinking.config import ShrinkingConfig
from podium.methods.shrinking.space import Arch
from podium.methods.shrinking.supernet import OFASupernet, _head, _stem


def _module_for_spec(spec: tuple, cfg: ShrinkingConfig) -> tuple[nn.Module, tuple[int, int, int]]:
    """A freshly initialised module with the shapes of one lookup-table entry, and its input shape."""
    kind = spec[0]
    if kind == "stem":
        _, in_chans, _, _, _, size = spec
        return _stem(cfg, in_chans), (in_chans, size, size)
    if kind == "head":
        _, in_ch, _, _, classes, size = spec
        return _head(cfg, in_ch, classes), (in_ch, size, size)
    _, in_ch, out_ch, mid, k, stride, red, act, size = spec
    return MBConv(in_ch, out_ch, mid, k, stride, act, red), (in_ch, size, size)


class LatencyTable:
    """Per-device latency lookup table: each distinct layer configuration is measured once on the
    device's runtime (threads/batch from its profile), lazily, and a network's latency is the sum
    of its layers' entries."""

    def __init__(self, supernet: OFASupernet, device: DeviceProfile, cfg: ShrinkingConfig) -> None:
        self.supernet, self.device, self.cfg = supernet, device, cfg
        self.profile = device.model_copy(update={"warmup": cfg.lut_warmup, "round_repeats": cfg.lut_repeats,
                                                 "min_rounds": 3, "max_rounds": 3, "max_seconds": cfg.lut_max_seconds})
        self.table: dict[tuple, float] = {}
        self.scale, self.offset = 1.0, 0.0  # whole-network correction, see calibrate()

    def entry_ms(self, spec: tuple) -> float:
        """One layer configuration measured on the device's runtime, through the one profiler."""
        if spec not in self.table:
            module, shape = _module_for_spec(spec, self.cfg)
            self.table[spec] = measure(module.eval(), shape, self.profile, memory=False).p50_ms
        return self.table[spec]

    def table_sum(self, arch: Arch | dict[str, Any]) -> float:
        return float(sum(self.entry_ms(spec) for spec in self.supernet.layer_specs(arch)))

    def predict(self, arch: Arch | dict[str, Any]) -> float:
        return self.scale * self.table_sum(arch) + self.offset

    def calibrate(self, archs: Sequence[Arch], measured_ms: Sequence[float]) -> None:
        """Fit measured = scale * table_sum + offset on a few whole networks.

        Summed per-layer timings miss the per-network overhead (framework dispatch, memory
        traffic between layers), so the raw sum reads low by a roughly constant share."""
        sums = np.array([self.table_sum(a) for a in archs])
        measured = np.asarray(measured_ms, dtype=float)
        if len(sums) >= 2 and np.ptp(sums) > 1e-9:
            self.scale, self.offset = (float(v) for v in np.polyfit(sums, measured, 1))
        elif len(sums):
            self.scale = float(measured.mean() / max(sums.mean(), 1e-9))
