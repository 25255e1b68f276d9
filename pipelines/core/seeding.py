"""Order-free seeded randomness: every random choice is a function of (seed, what it is about).

Deriving a per-item seed from the item's identity (not from iteration order or worker assignment) keeps
results identical across reruns, resumptions and any number of Ray workers.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed fixed by `seed` and `parts` (ids, names, indices)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def unit_hash(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) fixed by `seed` and `parts`: a stable draw per item."""
    return derive_seed(seed, *parts) / 2**63
