"""Exponential backoff with jitter, for retrying the Kubernetes API (and anything else that
must not hammer a recovering peer)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: initial, doubling up to ``maximum``; each delay is
    drawn from [d·(1-jitter), d]. Bounded so a recovered API is noticed within ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 0.3

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * (2.0 ** max(0, failures - 1)))
        return base * (1.0 - self.jitter * rng.random())
