"""Seeds keyed by what a draw is for, never by batch composition, in a module of its own so that
both the engines (sampling) and the pure scheduler (which teachers to ask) can use them."""

from __future__ import annotations

import hashlib


def derive_seed(base: int, *key: str | int) -> int:
    """A sampling seed that depends on the caller's key alone, never on batch composition, so a
    resumed or re-batched run samples exactly what an uninterrupted one did."""
    material = "\x1f".join(str(part) for part in (base, *key)).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") % (2**31 - 1)
