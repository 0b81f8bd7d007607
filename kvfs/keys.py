"""Key rules and chained block hashes.

Keys
----
A key is a ``str`` of 1-200 printable characters without ``/`` or NUL that
is not ``.`` or ``..``, or ``bytes`` (stored as its lowercase hex form, so a
bytes key of up to 100 bytes). A namespace follows the same rules with at
most 100 characters. Keys are content addresses: the same key always names
the same bytes, which is why objects are immutable.

Block hashes
------------
``block_hashes(token_ids, block_size, salt, parent)`` cuts the token ids into
full blocks and hashes each block together with the hash of the block before
it, like the prefix-cache keys of vLLM and SGLang: block *i*'s key depends on
every token before it, so two processes that saw the same prefix compute the
same keys, and a prefix lookup is a ``prefix_match`` over the list.
"""
from __future__ import annotations

import struct
from typing import Iterable, Sequence

import xxhash

from .errors import InvalidKey

MAX_KEY_CHARS = 200
MAX_NS_CHARS = 100

KeyLike = "str | bytes"


def _check_name(name: str, what: str, limit: int) -> str:
    if not 1 <= len(name) <= limit:
        raise InvalidKey(f"{what} must be 1-{limit} characters, got {len(name)}: {name[:40]!r}")
    if name in (".", ".."):
        raise InvalidKey(f"{what} may not be {name!r}")
    if "/" in name or "\x00" in name:
        raise InvalidKey(f"{what} may not contain '/' or NUL: {name[:40]!r}")
    if not name.isprintable():
        raise InvalidKey(f"{what} must be printable characters: {name[:40]!r}")
    return name


def normalize_key(key: object) -> str:
    """Return the stored (str) form of a key, or raise InvalidKey."""
    if isinstance(key, str):
        return _check_name(key, "key", MAX_KEY_CHARS)
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if not raw:
            raise InvalidKey("bytes key may not be empty")
        return _check_name(raw.hex(), "key (hex of bytes key)", MAX_KEY_CHARS)
    raise InvalidKey(f"key must be str or bytes, not {type(key).__name__}")


def normalize_ns(ns: object) -> str:
    if not isinstance(ns, str):
        raise InvalidKey(f"namespace must be str, not {type(ns).__name__}")
    return _check_name(ns, "namespace", MAX_NS_CHARS)


def normalize_keys(keys: Iterable[object]) -> list[str]:
    if isinstance(keys, (str, bytes)):
        raise InvalidKey("expected a list of keys, got a single key")
    ks = list(keys)
    # Fast path for a batch of str keys (what block_hashes makes): the same
    # rules as _check_name, checked with a few C-level passes over the whole
    # batch instead of a Python loop; anything odd takes the precise path.
    try:
        joined = "".join(ks)  # type: ignore[arg-type]  # TypeError unless all are str
    except TypeError:
        joined = ""
    if (joined and joined.isprintable() and "/" not in joined and not ks.count("")
            and max(map(len, ks)) <= MAX_KEY_CHARS and not ks.count(".") and not ks.count("..")):  # type: ignore[arg-type]
        return ks  # type: ignore[return-value]
    return [normalize_key(k) for k in ks]


def block_hashes(
    token_ids: Sequence[int],
    block_size: int = 16,
    salt: bytes = b"",
    parent: str | None = None,
) -> list[str]:
    """Chained prefix hashes of the full blocks of ``token_ids``.

    key[i] = xxh3_128(key[i-1] || len(salt) || salt || block_size || tokens of block i)
    where key[-1] is ``parent`` or a fixed root. The salt (model, adapter,
    cache layout...) is in every link, so different salts never share keys. A trailing partial
    block gets no key: it is not reusable until it is full. Returns 32-char
    lowercase hex strings, valid kvfs keys.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if isinstance(salt, str):
        salt = salt.encode()
    salt = bytes(salt)
    prev = bytes.fromhex(parent) if parent else xxhash.xxh3_128_digest(b"kvfs-root")
    out: list[str] = []
    n_full = len(token_ids) // block_size
    for b in range(n_full):
        block = token_ids[b * block_size:(b + 1) * block_size]
        h = xxhash.xxh3_128()
        h.update(prev)
        h.update(struct.pack("<I", len(salt)))
        h.update(salt)
        h.update(struct.pack("<I", block_size))
        h.update(struct.pack(f"<{block_size}q", *(int(t) for t in block)))
        prev = h.digest()
        out.append(prev.hex())
    return out
