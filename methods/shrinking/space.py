"""Sub-network descriptions (``Arch``) and the choices open at each point of shrinking (``OpenSpace``)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from podium.methods.shrinking.config import PhaseConfig, ShrinkingConfig


@dataclass(frozen=True)
class Arch:
    """One sub-network: input resolution, depth per unit, and (kernel, expand) per *active* block."""

    resolution: int
    depths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    expands: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for d, ks, es in zip(self.depths, self.kernels, self.expands):
            if len(ks) != d or len(es) != d:
                raise ValueError(f"unit at depth {d} needs {d} kernels and expands, got {ks}, {es}")

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "depths": list(self.depths),
                "kernels": [list(k) for k in self.kernels], "expands": [list(e) for e in self.expands]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Arch":
        return cls(int(d["resolution"]), tuple(int(v) for v in d["depths"]),
                   tuple(tuple(int(k) for k in ks) for ks in d["kernels"]),
                   tuple(tuple(float(e) for e in es) for es in d["expands"]))

    @property
    def name(self) -> str:
        ks = ",".join(str(k) for unit in self.kernels for k in unit)
        es = ",".join(f"{e:g}" for unit in self.expands for e in unit)
        return f"ofa-r{self.resolution}-d{','.join(map(str, self.depths))}-k{ks}-e{es}"


def _as_arch(arch: Arch | dict[str, Any]) -> Arch:
    return arch if isinstance(arch, Arch) else Arch.from_dict(arch)


@dataclass(frozen=True)
class OpenSpace:
    """The choices open at some point of progressive shrinking."""

    kernels: tuple[int, ...]
    depths: tuple[int, ...]
    expands: tuple[float, ...]
    resolutions: tuple[int, ...]

    @classmethod
    def full(cls, cfg: ShrinkingConfig) -> "OpenSpace":
        return cls(tuple(sorted(cfg.kernel_choices)), tuple(sorted(cfg.depth_choices)),
                   tuple(sorted(cfg.expand_choices)), tuple(sorted(cfg.resolutions)))

    @classmethod
    def largest(cls, cfg: ShrinkingConfig) -> "OpenSpace":
        return cls((max(cfg.kernel_choices),), (max(cfg.depth_choices),), (max(cfg.expand_choices),),
                   tuple(sorted(cfg.resolutions)))

    def opened(self, phase: PhaseConfig, cfg: ShrinkingConfig) -> "OpenSpace":
        def top(choices: Sequence, n: int | None) -> tuple:
            ordered = tuple(sorted(choices))
            return ordered if n is None else ordered[-n:]

        if phase.elastic == "kernel":
            return OpenSpace(top(cfg.kernel_choices, phase.num_choices), self.depths, self.expands, self.resolutions)
        if phase.elastic == "depth":
            return OpenSpace(self.kernels, top(cfg.depth_choices, phase.num_choices), self.expands, self.resolutions)
        if phase.elastic == "width":
            return OpenSpace(self.kernels, self.depths, top(cfg.expand_choices, phase.num_choices), self.resolutions)
        return self

    def sample(self, units: int, rng: random.Random, resolution: int | None = None) -> Arch:
        depths = tuple(rng.choice(self.depths) for _ in range(units))
        return Arch(resolution if resolution is not None else rng.choice(self.resolutions), depths,
                    tuple(tuple(rng.choice(self.kernels) for _ in range(d)) for d in depths),
                    tuple(tuple(rng.choice(self.expands) for _ in range(d)) for d in depths))

    def uniform(self, units: int, which: Literal["min", "mid", "max"]) -> Arch:
        def pick(choices: tuple) -> Any:
            return {"min": choices[0], "mid": choices[len(choices) // 2], "max": choices[-1]}[which]

        d = pick(self.depths)
        return Arch(pick(self.resolutions), (d,) * units, ((pick(self.kernels),) * d,) * units,
                    ((pick(self.expands),) * d,) * units)
