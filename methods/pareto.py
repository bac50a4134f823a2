"""Pareto fronts: the candidates no other candidate beats on both cost and accuracy."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def pareto_front(items: Sequence[T], cost: Callable[[T], float], value: Callable[[T], float]) -> list[T]:
    """Items not dominated (lower-or-equal cost and higher-or-equal value, one strictly), by cost."""
    ordered = sorted(items, key=lambda item: (cost(item), -value(item)))
    front: list[T] = []
    best = float("-inf")
    for item in ordered:
        if value(item) > best:
            front.append(item)
            best = value(item)
    return front
