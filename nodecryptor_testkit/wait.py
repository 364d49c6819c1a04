"""Waiting for a condition: the one polling helper of the tests and the lab, so that no test or
scenario synchronises on a fixed sleep that a slow machine could outrun."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(RuntimeError):
    """A condition did not hold before its deadline; the message names what was awaited."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    what: str = "a condition",
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that. An exception of a type in ``ignore`` counts as "not yet" (a service that is
    still starting); the last one is named if time runs out. Raises WaitTimeout after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as e:
            value, last = None, e
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)
