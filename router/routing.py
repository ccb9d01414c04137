"""Which arm answers a request, and which TorchServe host serves the attempt: pure functions of the experiment,
the request's key and override, the arms and hosts currently out of service, and the hosts' loads.

Sticky assignment is weighted rendezvous (highest-random-weight) hashing: every arm scores
`-weight / ln(u)`, where `u` is a uniform number derived from sha256(salt, key, arm), and the highest score
wins. The winner is arm i with probability weight_i / Σ weights, depends only on the salt, the key and the
weights (so it is the same in every router process and after every restart), and when one arm's weight
changes, keys move only into or out of that arm — the fewest moves any assignment can make. Taking an arm out
of service moves only that arm's keys.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection

from router.config import Arm, Experiment
from router.errors import BadRequest, UpstreamUnavailable, quoted

_SCALE = float(1 << 64)


def key_unit(salt: str, key: str, arm: str) -> float:
    """A uniform number in (0, 1) fixed by (salt, key, arm)."""
    digest = hashlib.sha256(f"{salt}\x00{key}\x00{arm}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / _SCALE


def sticky_arm(salt: str, key: str, weights: dict[str, float]) -> str:
    """The arm a key lands in: weighted rendezvous hashing over the arms with weight > 0."""
    best, best_score = "", -math.inf
    for arm, weight in weights.items():
        if weight <= 0:
            continue
        score = -weight / math.log(key_unit(salt, key, arm))
        if score > best_score:
            best, best_score = arm, score
    if not best:
        raise ValueError("no arm has a weight > 0")
    return best


def random_arm(weights: dict[str, float], rng: random.Random) -> str:
    """Weighted random choice among the arms with weight > 0."""
    total = sum(weight for weight in weights.values() if weight > 0)
    if total <= 0:
        raise ValueError("no arm has a weight > 0")
    point = rng.random() * total
    chosen = ""
    for arm, weight in weights.items():
        if weight <= 0:
            continue
        chosen = arm
        point -= weight
        if point < 0:
            break
    return chosen


def choose_arm(experiment: Experiment, weights: dict[str, float], key: str | None, override: str | None,
               unavailable: Collection[str], rng: random.Random) -> Arm:
    """The arm for one request.

    `override` (an arm name from the client) wins over everything, even an arm out of service: a pinned request
    goes where it was pinned or fails. Otherwise the arms in `unavailable` (open circuits, arms already tried)
    are skipped; with a key the choice is sticky, without one it is weighted random.
    """
    if override is not None:
        try:
            return experiment.arm(override)
        except KeyError:
            arms = ", ".join(arm.name for arm in experiment.arms)
            raise BadRequest(f"experiment {experiment.name!r} has no arm {quoted(override)} (arms: {arms})") from None
    candidates = {name: weight for name, weight in weights.items() if name not in unavailable and weight > 0}
    if not candidates:
        raise UpstreamUnavailable(f"no arm of experiment {experiment.name!r} is available "
                                  f"(out of service: {', '.join(sorted(unavailable)) or 'none'})")
    name = sticky_arm(experiment.salt, key, candidates) if key else random_arm(candidates, rng)
    return experiment.arm(name)


def choose_host(hosts: Collection[str], in_flight: dict[str, int], rng: random.Random) -> str | None:
    """The host for one attempt, among `hosts` (those available and not yet tried): the power of two choices —
    the less busy of two picked at random — spreads load almost as evenly as "least busy" without herding every
    router replica onto the same host. None when there is no host left."""
    if not hosts:
        return None
    ordered = sorted(hosts)
    if len(ordered) == 1:
        return ordered[0]
    first, second = rng.sample(ordered, 2)
    return first if in_flight.get(first, 0) <= in_flight.get(second, 0) else second
