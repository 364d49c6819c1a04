"""PATCH of ``nodes/<name>/status`` as the real API server treats it, for the fake.

- ``application/strategic-merge-patch+json``: maps merge key by key (null deletes), and
  ``status.conditions`` (like ``status.addresses``) merges by its patch merge key, ``type``:
  an entry whose type exists is merged into it, a new type is appended, the others stay.
- ``application/merge-patch+json`` (RFC 7386): maps merge, every list is replaced whole - a
  JSON merge patch of ``conditions`` drops the kubelet's conditions, as on a real server.
- anything else: 415. A body that is not a JSON object, or a conditions entry that is not an
  object with a string ``type``: 400, as the real server refuses them.

Through the status subresource only ``status`` changes: ``metadata`` and ``spec`` in the patch
are ignored (the real server resets them from the stored object for this subresource).
"""

from __future__ import annotations

import copy

from .cluster import ApiError
from .objects import merge_patch

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
MERGE_KEYS = {"conditions": "type", "addresses": "type"}


def _strategic(target: object, patch: object, path: str) -> object:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, MERGE_KEYS[key], f"{path}.{key}")
        else:
            result[key] = _strategic(result.get(key), value, f"{path}.{key}")
    return result


def _merge_list(current: object, patch: list, merge_key: str, path: str) -> list:
    items = [dict(i) for i in current if isinstance(i, dict)] if isinstance(current, list) else []
    for entry in patch:
        if not isinstance(entry, dict) or not isinstance(entry.get(merge_key), str):
            raise ApiError(
                400,
                "BadRequest",
                f"{path}: map: {entry!r} does not contain declared merge key: {merge_key}",
            )
        for i, item in enumerate(items):
            if item.get(merge_key) == entry[merge_key]:
                items[i] = _strategic(item, entry, path)
                break
        else:
            items.append(_strategic({}, entry, path))
    return items


def patch_status(old: dict, content_type: str, body: object) -> dict:
    """The Node after ``body``; raises ApiError (400, 415) for what the real server refuses."""
    if content_type not in (STRATEGIC, MERGE):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media "
            f"types include: {STRATEGIC}, {MERGE} (got {content_type!r})",
        )
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the patch is not a JSON object")
    status = body.get("status", {})
    if status is not None and not isinstance(status, dict):
        raise ApiError(400, "BadRequest", "status: expected an object")
    conditions = (status or {}).get("conditions")
    if conditions is not None and not isinstance(conditions, list):
        raise ApiError(400, "BadRequest", "status.conditions: expected a list")
    new = copy.deepcopy(old)
    patch = {"status": status}
    if content_type == STRATEGIC:
        merged = _strategic(new, patch, "")
    else:
        for entry in conditions or []:
            if not isinstance(entry, dict):
                raise ApiError(400, "BadRequest", "status.conditions: entries must be objects")
        merged = merge_patch(new, patch)
    merged["metadata"], merged["spec"] = (
        copy.deepcopy(old.get("metadata")),
        copy.deepcopy(old.get("spec", {})),
    )
    return merged
