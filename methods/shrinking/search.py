"""OFA's evolutionary search: predicted accuracy as fitness under a predicted-latency budget."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from podium.methods.shrinking.config import EvolutionConfig
from podium.methods.shrinking.space import Arch, OpenSpace

log = logging.getLogger("podium.shrinking")


@dataclass(frozen=True)
class SearchResult:
    arch: Arch
    predicted_acc: float
    predicted_latency_ms: float


def _mutate(arch: Arch, space: OpenSpace, evo: EvolutionConfig, rng: random.Random) -> Arch:
    resolution = rng.choice(space.resolutions) if rng.random() < evo.resolution_mutation_prob else arch.resolution
    depths, kernels, expands = [], [], []
    for d, ks, es in zip(arch.depths, arch.kernels, arch.expands):
        new_d = rng.choice(space.depths) if rng.random() < evo.mutation_prob else d
        ks = [rng.choice(space.kernels) if rng.random() < evo.mutation_prob else k for k in ks]
        es = [rng.choice(space.expands) if rng.random() < evo.mutation_prob else e for e in es]
        while len(ks) < new_d:  # deeper: new blocks drawn at random
            ks.append(rng.choice(space.kernels))
            es.append(rng.choice(space.expands))
        depths.append(new_d)
        kernels.append(tuple(ks[:new_d]))
        expands.append(tuple(es[:new_d]))
    return Arch(resolution, tuple(depths), tuple(kernels), tuple(expands))


def _crossover(a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Uniform crossover: each unit's depth and each block's kernel/expand from either parent."""
    depths, kernels, expands = [], [], []
    for u in range(len(a.depths)):
        d = rng.choice((a.depths[u], b.depths[u]))
        ks, es = [], []
        for i in range(d):
            donors = [p for p in (a, b) if i < p.depths[u]]
            ks.append(rng.choice(donors).kernels[u][i])
            es.append(rng.choice(donors).expands[u][i])
        depths.append(d)
        kernels.append(tuple(ks))
        expands.append(tuple(es))
    return Arch(rng.choice((a.resolution, b.resolution)), tuple(depths), tuple(kernels), tuple(expands))


def evolutionary_search(space: OpenSpace, units: int, predict_acc: Callable[[list[Arch]], np.ndarray],
                        predict_latency: Callable[[Arch], float], budget_ms: float, evo: EvolutionConfig,
                        seed: int = 0) -> list[SearchResult]:
    """OFA's evolution finder: fitness = predicted accuracy; samples over the budget are rejected.

    Returns the final population (parents + children), best first, without duplicates; empty if
    not even the smallest sub-network fits the budget.
    """
    rng = random.Random(seed)
    latency_cache: dict[Arch, float] = {}

    def latency(arch: Arch) -> float:
        if arch not in latency_cache:
            latency_cache[arch] = predict_latency(arch)
        return latency_cache[arch]

    def feasible(make: Callable[[], Arch]) -> Arch | None:
        for _ in range(evo.max_tries):
            arch = make()
            if latency(arch) <= budget_ms:
                return arch
        return None

    smallest = space.uniform(units, "min")
    if latency(smallest) > budget_ms:
        log.warning("even the smallest sub-network (%.2f ms predicted) exceeds the %.2f ms budget",
                    latency(smallest), budget_ms)
        return []
    population = [feasible(lambda: space.sample(units, rng)) or smallest for _ in range(evo.population)]
    scores = list(predict_acc(population))
    for _ in range(evo.generations):
        ranked = sorted(zip(scores, population), key=lambda t: -t[0])[:evo.parents]
        parents = [arch for _, arch in ranked]
        children = []
        for _ in range(evo.mutation_children):
            parent = rng.choice(parents)
            children.append(feasible(lambda: _mutate(parent, space, evo, rng)) or parent)
        for _ in range(evo.crossover_children):
            a, b = rng.choice(parents), rng.choice(parents)
            children.append(feasible(lambda: _crossover(a, b, rng)) or a)
        population = parents + children
        scores = [s for s, _ in ranked] + list(predict_acc(children)) if children else [s for s, _ in ranked]
    seen: set[Arch] = set()
    results = []
    for score, arch in sorted(zip(scores, population), key=lambda t: -t[0]):
        if arch not in seen:
            seen.add(arch)
            results.append(SearchResult(arch, float(score), latency(arch)))
    return results
