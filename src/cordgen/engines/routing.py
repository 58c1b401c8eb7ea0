"""Which replica of an engine serves each request: pure functions of the requests' routes (their
problem ids) and the replicas alive.

Affinity routing pins every problem to one replica by rendezvous (highest-random-weight)
hashing: a problem's beams share their prefixes round after round, so they go where those
prefixes are already cached; and a replica that joins or leaves moves only the problems it
gains or held, never the others'. Round-robin routing (for comparison: what a load balancer
that does not know the problems would do) spreads each call evenly instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cordgen.config import Routing


def replica_weight(route: str, replica: str) -> int:
    material = f"{route}\x1f{replica}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def replica_for(route: str, replicas: Sequence[str]) -> str:
    """The replica with the highest weight for this route (ties, which 64-bit hashes make
    vanishingly rare, go to the larger name)."""
    if not replicas:
        raise ValueError("no replica to route to")
    return max(replicas, key=lambda replica: (replica_weight(route, replica), replica))


def split_by_replica(
    routes: Sequence[str], replicas: Sequence[str], routing: Routing = "affinity"
) -> dict[str, list[int]]:
    """Request indices per replica, in request order; replicas with no request are left out, so
    one call per entry is all a round sends."""
    shares: dict[str, list[int]] = {}
    for index, route in enumerate(routes):
        spread = replicas[index % len(replicas)]
        replica = replica_for(route, replicas) if routing == "affinity" else spread
        shares.setdefault(replica, []).append(index)
    return {replica: shares[replica] for replica in replicas if replica in shares}
