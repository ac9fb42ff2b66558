"""Seeds derived from what a value is (seed, image index, ...), never from how work was split."""

from __future__ import annotations

import hashlib


# Recorded in training checkpoints: the draws of a run depend on it (kits before 2026-11-26 used BLAKE2b
# for training and SHA-256 for sampling and extraction; one hash since).
SEEDING = "sha256/1"


def seed_from(*parts) -> int:
    """A 63-bit torch.Generator seed: sha256 of the parts joined by ':' (first 8 bytes, little-endian)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
