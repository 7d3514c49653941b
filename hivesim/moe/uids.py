"""Expert uids on a grid (``ffn.3.14`` = prefix ``ffn`` + one coordinate per grid dimension) and the
DHT keys that declare them.

For ``ffn.3.14`` a server stores, each with the same expiration:

* key ``"ffn."``   subkey ``3``  -> ``1``          ("some expert under ffn.3. is alive")
* key ``"ffn.3."`` subkey ``14`` -> ``address``    (the expert itself)

so a beam search walks from the root prefix down one dimension per lookup, learning at each step which
next coordinates have at least one live expert behind them. Each subkey expires on its own, so an expert
whose server stops re-declaring it drops out of the search after ``expiration`` seconds.

Declarations are owned: the subkey is ``"<coordinate>[owner:<server's public key hex>]"``, so the DHT
accepts it only signed by that server, and nobody else can rewrite, redirect or erase it. Readers
(:func:`read_declarations`) ignore unowned subkeys, declarations whose address names another peer than
their owner, owners outside ``allowed_owners`` when one is given, and, where several owners declare the
same coordinate, keep the owner they saw first.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Collection, Iterable, MutableMapping, Sequence
from typing import Any

UID_DELIMITER = "."
# One spelling per expert: coordinates are ASCII decimal without leading zeros ("ffn.01" and "ffn.1" would be
# two names, hence two DHT records, for one expert), and nothing may follow the last one (``$`` would allow a
# trailing newline: fullmatch is used).
_COORD = r"(?:0|[1-9][0-9]*)"
_PATTERN = re.compile(rf"([A-Za-z_][\w\-]*)((?:\.{_COORD})+)")


def parse_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """``"ffn.3.14"`` -> ``("ffn", (3, 14))``; a clear ``ValueError`` for anything else (``"ffn.03"``,
    ``"ffn.3\\n"``: a uid has exactly one spelling, so that one expert has one declaration)."""
    match = _PATTERN.fullmatch(uid) if isinstance(uid, str) else None
    if match is None:
        raise ValueError(f"expert uid must look like 'prefix.1.2' (a name, then one integer per grid dimension, "
                         f"no leading zeros), got {uid!r}")
    return match.group(1), tuple(int(c) for c in match.group(2)[1:].split(UID_DELIMITER))


def is_valid_uid(uid: Any) -> bool:
    """hivemind's name: whether :func:`parse_uid` accepts ``uid``."""
    try:
        parse_uid(uid)
    except ValueError:
        return False
    return True


def make_uid(prefix: str, coords: Sequence[int]) -> str:
    return UID_DELIMITER.join([prefix, *map(str, coords)])


def prefix_key(prefix: str, coords: Sequence[int]) -> str:
    """The DHT key listing the live next coordinates under ``prefix.coords``: ``"ffn."``, ``"ffn.3."``."""
    return make_uid(prefix, coords) + UID_DELIMITER


def declaration_items(uids_to_addresses: dict[str, str], expiration_time: float,
                      owner: bytes | None = None) -> list[tuple[Any, Any, float, Any]]:
    """``store_many`` items that declare every expert (one record per grid level, see module docs),
    owned by ``owner`` (the declaring node's public key; readers ignore unowned declarations)."""
    marker = "" if owner is None else f"[owner:{owner.hex()}]"
    items: dict[tuple[str, int], Any] = {}
    for uid, address in uids_to_addresses.items():
        prefix, coords = parse_uid(uid)
        for depth in range(len(coords)):
            key = prefix_key(prefix, coords[:depth])
            items[(key, coords[depth])] = address if depth == len(coords) - 1 else 1
    return [(key, value, expiration_time, f"{sub}{marker}" if marker else sub) for (key, sub), value in items.items()]


_DECLARED = re.compile(r"^(\d{1,9})\[owner:([0-9a-f]{64})\]$")


def read_declarations(entries: Any, now: float, allowed_owners: Collection[bytes] | None = None,
                      first_owner: MutableMapping[int, bytes] | None = None) -> dict[int, Any]:
    """``{coordinate: value}`` of the live, owned declarations under one prefix key (a DHT dictionary
    ``{subkey: ValueWithExpiration}``); see the module docstring for what is ignored.

    ``first_owner`` (kept by the caller per key) remembers which owner each coordinate was first read
    from: while that owner's declaration lives, another owner's for the same coordinate is ignored."""
    from hivesim.net.identity import peer_id_from_public_key
    from hivesim.net.secure import address_peer_id

    if not isinstance(entries, dict):
        return {}
    by_coord: dict[int, dict[bytes, Any]] = {}
    for sub, item in entries.items():
        match = _DECLARED.match(sub) if isinstance(sub, str) else None
        if match is None or getattr(item, "expiration_time", 0) <= now:
            continue
        coord, owner = int(match.group(1)), bytes.fromhex(match.group(2))
        if allowed_owners is not None and owner not in allowed_owners:
            continue
        value = getattr(item, "value", None)
        if isinstance(value, str):  # an expert's address: it must be its owner's own server
            named = address_peer_id(value)
            try:
                if named is not None and named != peer_id_from_public_key(owner):
                    continue
            except ValueError:
                continue
        by_coord.setdefault(coord, {})[owner] = value
    out: dict[int, Any] = {}
    for coord, owners in by_coord.items():
        remembered = first_owner.get(coord) if first_owner is not None else None
        owner = remembered if remembered in owners else min(owners)
        if first_owner is not None and (coord in first_owner or len(first_owner) < 65536):  # bounded memory
            first_owner[coord] = owner
        out[coord] = owners[owner]
    return out


def expand_pattern(pattern: str) -> list[str]:
    """``"ffn.[0:4].[0:8]"`` -> every uid of that 4x8 grid; ``"ffn.3.[0:2]"`` -> ffn.3.0, ffn.3.1."""
    parts = pattern.split(UID_DELIMITER)
    ranges: list[Iterable[int]] = []
    for part in parts[1:]:
        m = re.fullmatch(rf"\[({_COORD}):({_COORD})\]", part)
        if m:
            ranges.append(range(int(m.group(1)), int(m.group(2))))
        elif re.fullmatch(_COORD, part):
            ranges.append([int(part)])
        else:
            raise ValueError(f"bad expert pattern {pattern!r}: each part after the prefix is N or [A:B]")
    return [make_uid(parts[0], coords) for coords in itertools.product(*ranges)]


def grid_uids(prefix: str, grid_size: Sequence[int]) -> list[str]:
    return [make_uid(prefix, c) for c in itertools.product(*(range(g) for g in grid_size))]


def share_of_grid(prefix: str, grid_size: Sequence[int], index: int, count: int, seed: int = 0) -> list[str]:
    """The uids host ``index`` of ``count`` hosts takes: a seeded shuffle of the grid dealt round-robin."""
    uids = grid_uids(prefix, grid_size)
    random.Random(f"{seed}:{prefix}").shuffle(uids)
    return sorted(uids[index::count], key=lambda u: parse_uid(u)[1])
