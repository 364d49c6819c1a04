"""The agent's records in its run directory (datapath choice, exemption policy names, peer
table): JSON files other processes of the node (``nodecryptor status``, ``explain``) read.
Written to a temporary name and renamed, so a reader never sees half a file."""

from __future__ import annotations

import json
import os


def write_json(path: str, data: object) -> None:
    """Replace ``path`` with ``data`` as JSON, creating its directory. Raises OSError."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str) -> object | None:
    """The content of ``path``, or None when it is missing or not JSON."""
    try:
        with open(path) as f:
            data: object = json.load(f)
    except (OSError, ValueError):
        return None
    return data


def read_json_object(path: str) -> dict[str, object] | None:
    """The JSON object in ``path``; None when it is missing, not JSON or not an object (every
    record of the run directory is an object)."""
    data = read_json(path)
    return data if isinstance(data, dict) else None
