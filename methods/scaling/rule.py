"""The pycls scaling rule (Dollár et al., CVPR 2021): strategies, multipliers and rounding. No torch.

Rounding follows pycls ``pycls/models/scaler.py`` and ``blocks.py``; see :mod:`podium.methods.scaling`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

# --------------------------------------------------------------------------------------------
# Strategies: which of depth/width/resolution scale, and the width's share of the flops growth.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A scaling strategy: the scaled dimensions and the width's flop share ``alpha``.

    The flops share not taken by width is split evenly between the other scaled dimensions;
    ``scale_groups`` scales the group width with the width (pycls ``g`` = ``w`` for fast scaling).
    """

    name: str
    dims: str  # subset of "dwr"
    alpha: float  # width share of flops growth (0 when width is not scaled)
    scale_groups: bool = False

    def shares(self) -> dict[str, float]:
        """Flop shares of d, w, r (sum to 1): flops ∝ d·w²·r² = s^(sd)·s^(sw)·s^(sr)."""
        shares = {"d": 0.0, "w": 0.0, "r": 0.0}
        if "w" in self.dims:
            shares["w"] = self.alpha
        others = [k for k in "dr" if k in self.dims]
        rest = 1.0 - shares["w"]
        for k in others:
            shares[k] = rest / len(others)
        return shares

    def exponents(self) -> dict[str, float]:
        """Exponents e with multiplier = s^e for d, w, r and the ideal flops/params/acts growth."""
        sh = self.shares()
        e_d, e_w, e_r = sh["d"], sh["w"] / 2.0, sh["r"] / 2.0
        return {"d": e_d, "w": e_w, "r": e_r, "flops": e_d + 2 * e_w + 2 * e_r,
                "params": e_d + 2 * e_w, "acts": e_d + e_w + 2 * e_r}


STRATEGIES: dict[str, Strategy] = {
    "d": Strategy("d", "d", 0.0),
    "w": Strategy("w", "w", 1.0),
    "r": Strategy("r", "r", 0.0),
    "dw": Strategy("dw", "dw", 0.5),
    "dr": Strategy("dr", "dr", 0.0),
    "wr": Strategy("wr", "wr", 0.5),
    "dwr": Strategy("dwr", "dwr", 1.0 / 3.0),
    "dWr": Strategy("dWr", "dwr", 0.8, scale_groups=True),
}
StrategyName = Literal["d", "w", "r", "dw", "dr", "wr", "dwr", "dWr"]


def get_strategy(strategy: str | Strategy) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown scaling strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy]


def scale_factors(strategy: str | Strategy, s: float) -> tuple[float, float, float]:
    """Depth, width and resolution multipliers (d, w, r) with d·w²·r² = s."""
    if s <= 0:
        raise ValueError(f"scale factor must be positive, got {s}")
    e = get_strategy(strategy).exponents()
    return s ** e["d"], s ** e["w"], s ** e["r"]


# --------------------------------------------------------------------------------------------
# Rounding rules (pycls scaler.py / blocks.py)
# --------------------------------------------------------------------------------------------


def round_depth(depth: int, d: float) -> int:
    """Whole blocks, at least one (Python's round: half to even, as pycls)."""
    return max(1, round(depth * d))


def round_width(width: int, w: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` (8), at least ``divisor``."""
    return max(1, round(width * w / divisor)) * divisor


def round_group_width(group_width: int, g: float) -> int:
    """pycls's snapping of a scaled group width: ≤2 kept, ≤5 → 4, else a multiple of 8."""
    g_new = max(1, round(group_width * g))
    return g_new if g_new <= 2 else 4 if g_new <= 5 else round(g_new / 8) * 8


def adjust_block_compatibility(widths: Sequence[int], bottle_ratios: Sequence[float],
                               group_widths: Sequence[int]) -> tuple[list[int], list[float], list[int]]:
    """Make each bottleneck width ``w·b`` a multiple of its group width (pycls blocks.py)."""
    vs = [int(max(1, w * b)) for w, b in zip(widths, bottle_ratios)]
    gs = [int(min(g, v)) for g, v in zip(group_widths, vs)]
    ms = [math.lcm(g, int(b)) if b > 1 else g for g, b in zip(gs, bottle_ratios)]
    vs = [max(m, int(round(v / m) * m)) for v, m in zip(vs, ms)]
    ws = [int(v / b) for v, b in zip(vs, bottle_ratios)]
    assert all(int(w * b) % g == 0 for w, b, g in zip(ws, bottle_ratios, gs))
    return ws, list(bottle_ratios), gs


def scale_resolution(resolution: int, r: float, divisor: int = 4) -> int:
    """pycls: ``round(r·res/4)·4``; ``divisor`` is a base setting (small bases use 2, see RegNetBase)."""
    return max(divisor, round(resolution * r / divisor) * divisor)
