"""The record of which datapath the agent chose and why, kept in ``settings.run_dir`` so that
``nodecryptor status`` (another process) can show it. Written by the selection, read by the
status command; the two never import each other."""

from __future__ import annotations

import logging
import os
import time

from nodecryptor.core.log import kv
from nodecryptor.core.runfiles import read_json_object, write_json
from nodecryptor.core.settings import Settings

log = logging.getLogger(__name__)

CHOICE_FILE = "datapath.json"


def choice_path(settings: Settings) -> str:
    return os.path.join(settings.run_dir, CHOICE_FILE)


def record_choice(settings: Settings, name: str, reason: str) -> None:
    """Persist the choice for other processes; a read-only run directory only loses the
    status line, never the agent."""
    path = choice_path(settings)
    try:
        write_json(path, {"datapath": str(name), "reason": reason, "since": time.time()})
    except OSError as e:
        log.warning("cannot record the datapath choice", extra=kv(path=path, error=str(e)))


def last_choice(settings: Settings) -> dict[str, object] | None:
    """What the agent last chose, or None when nothing was recorded."""
    return read_json_object(choice_path(settings))
