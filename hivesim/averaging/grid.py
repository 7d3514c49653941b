"""Group keys and the Moshpit grid.

A peer looks for its group under ``{prefix}.0b{bits}``. On a virtual grid of ``M ** d`` cells
(``M = 2 ** k``) a key holds ``(d - 1) * k`` bits: the coordinates of a line of the grid, one k-bit chunk
per axis but the one being averaged. After a round each member drops its oldest chunk and appends its
index in the group (members are ordered by a permutation derived from the group id, which every member
knows), so former groupmates land in different lines next round: with a full grid and no failures the
exact mean is reached in ``d`` rounds. A peer that sat a round out rotates in the coordinate it held
before, which keeps it on the line it would have been on.

Bits adapt to the swarm: a bucket holding at least ``3 x target`` peers makes its peers append a random
bit (split the bucket), one holding fewer than ``target / 2`` makes them drop the oldest bit (merge).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

_BITS = set("01")


def group_key(prefix: str, bits: str) -> str:
    """The DHT key peers with these bits meet under."""
    return f"{prefix}.0b{bits}"


def check_bits(bits: str) -> str:
    if not isinstance(bits, str) or not set(bits) <= _BITS:
        raise ValueError(f"group bits must be a string of 0s and 1s, got {bits!r}")
    return bits


def member_order(group_id: bytes, peer_ids: Sequence[bytes]) -> list[int]:
    """Positions of ``peer_ids`` sorted by a hash keyed with the group id: the same on every member, and
    unrelated between groups (so indices reshuffle peers from round to round)."""
    keyed = [hashlib.blake2b(pid, key=group_id[:64], digest_size=16).digest() for pid in peer_ids]
    return sorted(range(len(peer_ids)), key=lambda i: keyed[i])


def index_bits(index: int, width: int) -> str:
    return format(index % (1 << width), f"0{width}b") if width else ""


@dataclass
class GroupKeyManager:
    """A peer's current group bits and how they move between rounds.

    Args:
        prefix: the averaged state's name (peers averaging different things use different prefixes).
        bits: the initial bits, e.g. the line of the grid the peer starts on.
        chunk: bits per grid axis (k, with M = 2 ** k peers per group); 0 keeps the bits fixed.
        hidden: the peer's coordinate on the axis averaged this round (k bits) — used when it sits out.
        target_group_size: for adapting the number of bits; None disables adaptation.
    """

    prefix: str
    bits: str = ""
    chunk: int = 0
    hidden: str = ""
    target_group_size: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_bits(self.hidden)
        if self.chunk < 0:
            raise ValueError("chunk must be >= 0")
        if self.chunk and not self.hidden:
            self.hidden = index_bits(self.rng.randrange(1 << self.chunk), self.chunk)

    @property
    def key(self) -> str:
        return group_key(self.prefix, self.bits)

    def after_group(self, my_index: int) -> None:
        """Rotate after averaging in a group where this peer had position ``my_index``."""
        self._rotate(index_bits(my_index, self.chunk))

    def after_sitting_out(self) -> None:
        """Rotate after a round without a group: move on along the peer's own coordinate."""
        self._rotate(self.hidden)

    def _rotate(self, new_chunk: str) -> None:
        if not self.chunk or not self.bits:
            return
        k = min(self.chunk, len(self.bits))
        self.hidden, self.bits = self.bits[:k], self.bits[k:] + new_chunk[-k:].rjust(k, "0")

    def adapt(self, bucket_size: int) -> None:
        """Split an over-full bucket (add a random bit) or merge an under-full one (drop the oldest)."""
        target = self.target_group_size
        if not target:
            return
        if bucket_size >= 3 * target:
            self.bits += str(self.rng.randrange(2))
        elif bucket_size < target / 2 and self.bits:
            self.bits = self.bits[1:]


def grid_position(cell: int, side: int, dims: int) -> list[int]:
    """Coordinates of ``cell`` on a ``side ** dims`` grid (first axis most significant)."""
    coords = []
    for _ in range(dims):
        coords.append(cell % side)
        cell //= side
    return coords[::-1]


def grid_manager(prefix: str, cell: int, side: int, dims: int, **kwargs) -> GroupKeyManager:
    """A key manager for a peer at ``cell`` of a ``side ** dims`` grid (``side`` a power of two): its key
    is the coordinates on axes 1..d-1, its hidden coordinate the one on axis 0."""
    chunk = side.bit_length() - 1
    if side < 2 or 1 << chunk != side:
        raise ValueError(f"grid side must be a power of two >= 2, got {side}")
    coords = grid_position(cell, side, dims)
    bits = "".join(index_bits(c, chunk) for c in coords[1:])
    return GroupKeyManager(prefix, bits, chunk, hidden=index_bits(coords[0], chunk), **kwargs)
