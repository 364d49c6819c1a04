"""Choosing the datapath: ``--datapath bpf|iprule|auto``.

``bpf`` starts the BPF backend or fails (no silent fallback: an operator who asked for BPF must
learn that it does not work). ``iprule`` starts the policy-routing backend. ``auto`` tries BPF
and falls back to ip rules when BPF is not supported here (``NotSupported``), fails to start
(``DatapathError``) or cannot even be imported (``ImportError``, e.g. no bcc).

Whichever mode is chosen, the other mode's leftovers are removed right after the chosen one's
first successful ``apply`` (``HandOver``), so a node never keeps enforcing with both. Not
earlier: starting only loads, and the first apply waits for the first list of CiliumNodes; a
pinned BPF program or installed rules from the previous run keep encrypting until then. The
two may overlap briefly, which is harmless: traffic the rules route into WireGuard never
reaches the underlay device the BPF program watches.

The reason for the choice is logged, exported as ``nodecryptor_datapath_info{datapath,
reason}`` and recorded in ``settings.run_dir`` (``choice.record_choice``) so ``nodecryptor
status`` (another process) can show it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nodecryptor.core.errors import DatapathError, NotSupported
from nodecryptor.core.log import kv
from nodecryptor.core.settings import DatapathMode, Settings
from nodecryptor.datapath.base import Datapath
from nodecryptor.datapath.choice import record_choice

log = logging.getLogger(__name__)

BackendStarter = Callable[[Settings, object], Datapath]
"""Starts the BPF backend: (settings, metrics) -> a started Datapath."""


def start_bpf(settings: Settings, metrics) -> Datapath:
    # Imported here: the BPF backend pulls in bcc, which may be missing on this machine.
    from nodecryptor.datapath.bpf.backend import BpfDatapath

    return BpfDatapath(settings, metrics).start()


def _start_iprule(settings: Settings, metrics, netns: str | None) -> Datapath:
    from nodecryptor.datapath.iprule.backend import IpRuleDatapath

    return IpRuleDatapath(settings, metrics, netns=netns).start()


def _remove_bpf_state(settings: Settings) -> None:
    """Remove an earlier BPF attachment (pins, links) before enforcing with ip rules."""
    try:
        from nodecryptor.datapath.bpf import inspect as bpf_inspect
    except ImportError as e:
        log.warning("cannot check for BPF leftovers", extra=kv(error=str(e)))
        return
    if bpf_inspect.active(settings):
        result = bpf_inspect.cleanup(settings)
        log.info(
            "removed the BPF datapath now that ip rules enforce",
            extra=kv(**{k: v for k, v in result.items() if isinstance(v, (int, str, bool))}),
        )


def _remove_iprule_state(settings: Settings, netns: str | None) -> None:
    from nodecryptor.datapath.iprule import inspect as iprule_inspect

    if iprule_inspect.active(settings, netns):
        result = iprule_inspect.cleanup(settings, netns)
        log.info("removed the ip-rule datapath now that BPF enforces", extra=kv(**result))


class HandOver:
    """The chosen datapath, which removes the other mode's state after its first successful
    ``apply``. Everything else (including backend-specific attributes) is the wrapped
    backend's; ``backend`` gives it unwrapped."""

    def __init__(self, backend: Datapath, remove_other):
        self.backend = backend
        self.name = backend.name
        self._remove_other = remove_other
        self.handed_over = False

    def apply(self, desired) -> None:
        self.backend.apply(desired)
        if not self.handed_over:
            try:
                self._remove_other()
            except Exception as e:  # a failed removal must not fail the apply; retried next time
                log.warning(
                    "cannot remove the other datapath's state yet",
                    extra=kv(datapath=self.name, error=str(e)),
                )
                return
            self.handed_over = True

    def observe(self):
        return self.backend.observe()

    def close(self) -> None:
        self.backend.close()

    def cleanup(self) -> None:
        self.backend.cleanup()

    def __getattr__(self, attr):
        return getattr(self.backend, attr)


def choose_datapath(
    settings: Settings,
    metrics=None,
    netns: str | None = None,
    bpf_starter: BackendStarter = start_bpf,
) -> tuple[Datapath, str]:
    """Start the datapath ``settings.datapath`` asks for; return it and why it was chosen.

    ``netns`` applies to the ip-rule backend only; the BPF backend runs where the agent runs.
    ``bpf_starter`` starts the BPF backend; whatever it raises (NotSupported, DatapathError,
    ImportError) is what ``auto`` falls back on."""
    mode = settings.datapath
    if mode is DatapathMode.IPRULE:
        datapath = _start_iprule(settings, metrics, netns)
        reason = "requested: --datapath iprule"
    elif mode is DatapathMode.BPF:
        # No fallback: NotSupported propagates with the feature that is missing.
        datapath = bpf_starter(settings, metrics)
        reason = "requested: --datapath bpf"
    else:
        try:
            datapath = bpf_starter(settings, metrics)
            reason = "auto: BPF program compiled and loaded"
        except (NotSupported, DatapathError, ImportError) as e:
            why = f"{type(e).__name__}: {e}"
            log.warning("BPF datapath unavailable, falling back to ip rules", extra=kv(reason=why))
            try:
                datapath = _start_iprule(settings, metrics, netns)
            except NotSupported as iprule_error:
                raise NotSupported(
                    "datapath", f"BPF: {why}; ip rules: {iprule_error}"
                ) from iprule_error
            reason = f"auto: fell back to ip rules because BPF is unavailable ({why})"
    if datapath.name == DatapathMode.IPRULE:
        datapath = HandOver(datapath, lambda: _remove_bpf_state(settings))
    else:
        datapath = HandOver(datapath, lambda: _remove_iprule_state(settings, netns))
    log.info("datapath chosen", extra=kv(datapath=datapath.name, reason=reason))
    if metrics is not None:
        metrics.datapath.info({"datapath": datapath.name, "reason": reason})
    record_choice(settings, datapath.name, reason)
    return datapath, reason
