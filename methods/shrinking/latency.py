"""Per-device latency lookup table: layer configurations measured on the device's runtime, the way the
pipeline measures candidates (one pinned process, interleaved rounds:
:func:`~podium.methods.profiling.measure_isolated`)."""
from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from podium.methods.profiling import Artifact, DeviceProfile, LatencyStats, measure_isolated
from podium.methods.shrinking.blocks import MBConv
from podium.methods.shrinking.config import ShrinkingConfig
from podium.methods.shrinking.space import Arch, OpenSpace, _as_arch
from podium.methods.shrinking.supernet import OFASupernet, _head, _stem, extract_subnet


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


@functools.lru_cache(maxsize=4)
def _random_supernet(cfg_json: str, in_chans: int, num_classes: int) -> OFASupernet:
    torch.manual_seed(0)
    return OFASupernet(ShrinkingConfig.model_validate_json(cfg_json), in_chans, num_classes).eval()


def timing_module(cfg: dict[str, Any], in_chans: int, num_classes: int, spec: list | None = None,
                  arch: dict[str, Any] | None = None) -> nn.Module:
    """The module to time for one lookup-table ``spec``, or a whole sub-network ``arch`` extracted from a
    randomly initialised supernet (latency depends on shapes, not weights). Built inside the measuring
    process: the recipe of an :class:`~podium.methods.profiling.Artifact`."""
    config = ShrinkingConfig.model_validate(cfg)
    if spec is not None:
        return _module_for_spec(tuple(spec), config)[0].eval()
    supernet = _random_supernet(json.dumps(cfg, sort_keys=True), in_chans, num_classes)
    return extract_subnet(supernet, _as_arch(arch)).eval()


class LatencyTable:
    """Per-device latency lookup table: every layer configuration the search space can run, measured on
    the device's runtime (threads/batch from its profile) in one isolated process the first time the
    table is read, together with the whole networks it is calibrated on; a network's latency is the sum
    of its layers' entries, scaled and offset by :meth:`calibrate`.

    Entries and calibration networks share one process and its interleaved rounds on purpose: on a
    shared host the same network measured in two fresh processes moved by 10-30 %, far more than the
    predictor's own error (see bench/shrinking.py). Every later measurement of the table (whole
    networks the search checks) is reported at the reference speed of that first process
    (:func:`~podium.methods.profiling.normalise_to_reference`)."""

    def __init__(self, supernet: OFASupernet, device: DeviceProfile, cfg: ShrinkingConfig,
                 space: OpenSpace | None = None) -> None:
        self.supernet, self.device, self.cfg = supernet, device, cfg
        self.space = space or OpenSpace.full(cfg)
        self.profile = device.model_copy(update={"warmup": cfg.lut_warmup, "round_repeats": cfg.lut_repeats,
                                                 "max_rounds": cfg.lut_max_rounds,
                                                 "max_seconds": cfg.lut_max_seconds})
        self.table: dict[tuple, float] = {}
        self.scale, self.per_layer, self.offset = 1.0, 0.0, 0.0  # whole-network correction, see calibrate()
        self.fit = ""  # which correction calibrate() chose

    def _recipe(self, name: str, shape: tuple[int, int, int], **what: Any) -> Artifact:
        return Artifact(name, None, shape, build="podium.methods.shrinking.latency:timing_module",
                        build_args={"cfg": self.cfg.model_dump(mode="json"), "in_chans": self.supernet.in_chans,
                                    "num_classes": self.supernet.num_classes, **what})

    def measure(self, specs: Sequence[tuple] = (), archs: Sequence[Arch] = ()) -> list[float]:
        """Measure layer ``specs`` (those not in the table yet, which it then holds) and whole sub-networks
        ``archs`` (random weights, their shapes) together, interleaved, in one pinned process; returns the
        archs' p50s."""
        return [s.p50_ms for s in self.measure_stats(specs, archs)]

    def measure_stats(self, specs: Sequence[tuple] = (), archs: Sequence[Arch] = ()) -> list[LatencyStats]:
        """:meth:`measure`, returning the archs' whole statistics (intervals, noise)."""
        todo = sorted({s for s in specs if s not in self.table}, key=repr)
        items = [self._recipe(f"layer{i}", _module_for_spec(s, self.cfg)[1], spec=list(s)) for i, s in enumerate(todo)]
        items += [self._recipe(f"net{i}", (self.supernet.in_chans, a.resolution, a.resolution), arch=a.to_dict())
                  for i, a in enumerate(archs)]
        # a round of ~150 models outlasts the host's speed: the reference is timed again every 10 models
        size = max(self.cfg.resolutions)
        stats = (measure_isolated(items, self.profile, memory=False, reference_every=10,
                                  reference_input=(self.supernet.in_chans, size, size)) if items else {})
        if stats and self.profile.reference_ms is None:  # later measurements at the table's reference speed
            self.profile = self.profile.model_copy(update={"reference_ms": next(iter(stats.values())).reference_ms})
        self.table.update({spec: stats[f"layer{i}"].p50_ms for i, spec in enumerate(todo)})
        return [stats[f"net{i}"] for i in range(len(archs))]

    def entry_ms(self, spec: tuple) -> float:
        """One layer configuration's p50; the first read measures every entry of the space at once."""
        if spec not in self.table:
            self.measure([*self.supernet.all_layer_specs(self.space), spec])
        return self.table[spec]

    def table_sum(self, arch: Arch | dict[str, Any]) -> float:
        return float(sum(self.entry_ms(spec) for spec in self.supernet.layer_specs(arch)))

    def predict(self, arch: Arch | dict[str, Any]) -> float:
        return self.scale * self.table_sum(arch) + self.per_layer * len(self.supernet.layer_specs(arch)) + self.offset

    def measure_archs(self, archs: Sequence[Arch]) -> list[float]:
        """Whole sub-networks' p50, measured the same isolated way (in a process of their own)."""
        return self.measure(archs=archs)

    def calibrate(self, archs: Sequence[Arch], measured_ms: Sequence[float] | None = None) -> None:
        """Fit measured = scale * table_sum + per_layer * layers + offset on whole networks (measured here
        unless given, in the same process as the table's entries while the table is still empty).

        Each entry, timed alone, pays one call's fixed cost (ONNX Runtime's ``run``: binding, copies) that
        the whole network pays once, and misses what the network adds (activations leaving the cache,
        the stem's and head's dispatch). The per-layer term is always fitted: over 24 tables measured on
        the shared VM (ONNX Runtime at 1 and 2 threads, torch at 1; 20-40 unseen networks each), keeping it
        lowered the tables' median error from 5.2 to 3.8 % and their worst from 17.8 to 14.2 % (means over
        the tables), better than choosing it left-one-out on the 8 calibration networks (4.3 / 15.4 %). Fewer networks than that fit scale and
        offset, or scale alone."""
        if measured_ms is None:
            specs = [] if self.table else self.supernet.all_layer_specs(self.space)
            measured_ms = self.measure(specs, archs)
        measured = np.asarray(measured_ms, dtype=float)
        sums = np.array([self.table_sum(a) for a in archs])
        layers = np.array([len(self.supernet.layer_specs(a)) for a in archs], dtype=float)
        ones = np.ones_like(sums)
        designs = {"scale+per-layer+offset": np.stack([sums, layers, ones], axis=1),
                   "scale+offset": np.stack([sums, ones], axis=1)}
        for name, design in designs.items():
            if len(sums) < design.shape[1] + 2 or np.linalg.matrix_rank(design) < design.shape[1]:
                continue
            weights = np.linalg.lstsq(design, measured, rcond=None)[0]
            if weights[0] > 0:
                self.fit, self.scale, self.offset = name, float(weights[0]), float(weights[-1])
                self.per_layer = float(weights[1]) if len(weights) == 3 else 0.0
                return
        if len(sums):
            self.fit, self.scale = "scale", float(measured.mean() / max(sums.mean(), 1e-9))
