"""Object meta: a small JSON-able dict (dtype, shape, layout...), stored as
compact JSON bytes of at most MAX_META bytes. Checked by the client before
sending and again by the daemon."""
from __future__ import annotations

import json

from .errors import InvalidArgument

MAX_META = 4096


def encode_meta(meta: object) -> bytes | None:
    if meta is None:
        return None
    if isinstance(meta, (bytes, bytearray, str)):
        raw = meta.encode() if isinstance(meta, str) else bytes(meta)
        try:
            if not isinstance(json.loads(raw), dict):
                raise ValueError
        except ValueError:
            raise InvalidArgument("meta must encode a JSON object") from None
    else:
        if not isinstance(meta, dict):
            raise InvalidArgument(f"meta must be a dict, not {type(meta).__name__}")
        try:
            raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"meta must be JSON-able: {e}") from None
    if len(raw) > MAX_META:
        raise InvalidArgument(f"meta is {len(raw)} bytes encoded; the limit is {MAX_META}")
    return raw
