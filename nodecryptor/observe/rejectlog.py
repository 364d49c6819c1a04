"""Report admission's rejections and conflicts once each: logged and counted when they first
appear, silent while they persist, forgotten when they go (so a recurrence is reported
again). The reconcile loop computes a plan on every pass; without this every pass would
repeat the same warnings."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nodecryptor.core.log import kv
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import Rejection

log = logging.getLogger("nodecryptor.admission")


class RejectionLog:
    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics
        self._active: frozenset[Rejection] = frozenset()

    def report(self, rejections: Iterable[Rejection]) -> list[Rejection]:
        """Log and count the rejections not reported since they last appeared; return them."""
        current = frozenset(rejections)
        new = sorted(current - self._active, key=lambda r: (r.obj, r.field, r.value, r.reason))
        self._active = current
        for rej in new:
            if rej.kind != "CiliumNode":
                log.warning(
                    f"{rej.kind} rejected",
                    extra=kv(
                        name=rej.obj,
                        field=rej.field,
                        value=rej.value,
                        reason=rej.reason,
                        why=rej.why,
                    ),
                )
                continue
            log.warning(
                "CiliumNode claim rejected"
                if rej.reason != "duplicate-claim"
                else "CiliumNode claim conflict",
                extra=kv(
                    node=rej.obj, field=rej.field, value=rej.value, reason=rej.reason, why=rej.why
                ),
            )
        if self.metrics is not None:
            self.metrics.record_claim_rejections(new)
        return new
