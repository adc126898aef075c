"""How a route picks a variant: weighted random, sticky (weighted rendezvous hashing), or a bandit over rewards.

Sticky routing hashes (key, variant name) with a keyed BLAKE2b digest — stable across processes and restarts,
unlike Python's `hash()` — and picks the variant with the highest weighted rendezvous score `-w / ln(u)`. A
weight change then moves only the keys that must move (50/50 -> 60/40 moves about 10 % of keys).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Protocol

from gateway.routing.table import BanditSettings

_STICKY_KEY = b"gatewatch-sticky-v1"


class Chooser(Protocol):
    def choose(self, key: str | None) -> int:
        """Index of the variant to serve a request whose sticky key is `key` (None: no key)."""
        ...


class WeightedChooser:
    def __init__(self, weights: list[float], rng: random.Random | None = None) -> None:
        top = max(weights)  # relative weights, scaled so that their sum cannot overflow to inf
        self._cumulative = list(itertools.accumulate(w / top for w in weights))
        self._total = self._cumulative[-1]
        self._random = (rng or random.Random()).random

    def choose(self, key: str | None = None) -> int:
        return bisect.bisect_right(self._cumulative, self._random() * self._total)


def unit_hash(key: str, name: str) -> float:
    """A uniform number in (0, 1) determined by (key, name) alone."""
    digest = hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8, key=_STICKY_KEY).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


class StickyChooser:
    def __init__(self, names: list[str], weights: list[float], rng: random.Random | None = None) -> None:
        self._names = names
        self._weights = weights
        self._fallback = WeightedChooser(weights, rng)

    def choose(self, key: str | None) -> int:
        if not key:
            return self._fallback.choose()
        scores = [-w / math.log(unit_hash(key, name)) for name, w in zip(self._names, self._weights, strict=True)]
        return scores.index(max(scores))


@dataclass
class ArmStats:
    pulls: int = 0
    reward_sum: float = 0.0
    reward_count: int = 0

    @property
    def reward_mean(self) -> float | None:
        return self.reward_sum / self.reward_count if self.reward_count else None


class BanditChooser:
    """Thompson sampling (Beta posterior over rewards in [0, 1]) or epsilon-greedy, with an exploration floor.

    With probability `min_share * k` a variant is drawn uniformly, so each of the k variants gets at least about
    `min_share` of the traffic however the rewards look. Thompson sampling clips rewards to [0, 1].
    """

    def __init__(self, arms: int, settings: BanditSettings, rng: random.Random | None = None) -> None:
        self.arms = [ArmStats() for _ in range(arms)]
        self._settings = settings
        self._rng = rng or random.Random()

    def choose(self, key: str | None = None) -> int:
        k = len(self.arms)
        if self._rng.random() < self._settings.min_share * k:
            index = self._rng.randrange(k)
        elif self._settings.algorithm == "thompson":
            index = self._thompson()
        else:
            index = self._epsilon_greedy()
        self.arms[index].pulls += 1
        return index

    def reward(self, index: int, value: float) -> None:
        arm = self.arms[index]
        arm.reward_sum += value
        arm.reward_count += 1

    def _thompson(self) -> int:
        draws = []
        for arm in self.arms:
            successes = min(max(arm.reward_sum, 0.0), float(arm.reward_count))
            draws.append(self._rng.betavariate(1 + successes, 1 + arm.reward_count - successes))
        return draws.index(max(draws))

    def _epsilon_greedy(self) -> int:
        if self._rng.random() < self._settings.epsilon:
            return self._rng.randrange(len(self.arms))
        means = [arm.reward_mean if arm.reward_mean is not None else math.inf for arm in self.arms]
        return means.index(max(means))
