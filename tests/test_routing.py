"""Routing as pure functions, the config's validation and the statistics of a verdict: no server involved."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest

from router.circuits import CircuitBreaker
from router.config import (
    Arm,
    Experiment,
    Target,
    check_targets,
    parse_config,
    with_weights,
)
from router.errors import BadRequest, ConfigError, UpstreamUnavailable
from router.request import labels_of, single_label
from router.routing import choose_arm, random_arm, sticky_arm
from router.stats import percentile, wilson_interval
from serving.client import Reply

KEYS = [f"user-{i}" for i in range(20_000)]
# Binomial standard error of a share over 20,000 keys is at most 0.35 points; 1.5 points is > 4 sigma.
SHARE_TOLERANCE = 0.015


def shares(assignments: list[str]) -> dict[str, float]:
    counts = Counter(assignments)
    return {arm: count / len(assignments) for arm, count in counts.items()}


def experiment(weights: dict[str, float], salt: str = "salt") -> Experiment:
    arms = tuple(Arm(name, Target(f"model-{name}", "1.0"), weight) for name, weight in weights.items())
    return Experiment("exp", arms, control=arms[0].name, salt=salt)


@pytest.mark.parametrize("weights", [{"a": 50, "b": 50}, {"a": 40, "b": 20, "c": 20, "d": 20}, {"a": 1, "b": 9}])
def test_sticky_and_random_assignment_converge_to_the_weights(weights: dict[str, float]) -> None:
    total = sum(weights.values())
    sticky = shares([sticky_arm("salt", key, weights) for key in KEYS])
    rng = random.Random(0)
    unkeyed = shares([random_arm(weights, rng) for _ in KEYS])
    for arm, weight in weights.items():
        assert sticky[arm] == pytest.approx(weight / total, abs=SHARE_TOLERANCE)
        assert unkeyed[arm] == pytest.approx(weight / total, abs=SHARE_TOLERANCE)


def test_a_key_always_lands_in_the_same_arm_in_any_process() -> None:
    weights = {"a": 40, "b": 30, "c": 30}
    here = [sticky_arm("exp-1", key, weights) for key in KEYS[:200]]
    assert here == [sticky_arm("exp-1", key, weights) for key in KEYS[:200]]
    code = ("from router.routing import sticky_arm\n"
            f"print(','.join(sticky_arm('exp-1', f'user-{{i}}', {weights!r}) for i in range(200)))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env={"PYTHONHASHSEED": "123"})  # a different str hash seed changes nothing
    assert other_process.stdout.strip().split(",") == here
    # another experiment's salt assigns independently
    assert [sticky_arm("exp-2", key, weights) for key in KEYS[:200]] != here


def test_changing_weights_moves_the_fewest_keys() -> None:
    before = {key: sticky_arm("salt", key, {"a": 50, "b": 50}) for key in KEYS}
    after = {key: sticky_arm("salt", key, {"a": 60, "b": 40}) for key in KEYS}
    moved = [(before[key], after[key]) for key in KEYS if before[key] != after[key]]
    assert set(moved) == {("b", "a")}  # only into the arm that grew
    assert len(moved) / len(KEYS) == pytest.approx(0.10, abs=SHARE_TOLERANCE)  # the minimum: 10 % of keys

    three = {"a": 40, "b": 30, "c": 30}
    before3 = {key: sticky_arm("salt", key, three) for key in KEYS}
    after3 = {key: sticky_arm("salt", key, {**three, "c": 60}) for key in KEYS}
    moved3 = [(before3[key], after3[key]) for key in KEYS if before3[key] != after3[key]]
    assert {destination for _, destination in moved3} == {"c"}  # a and b never trade keys
    # c's share goes from 30 % to 60/130 = 46.2 %: exactly that many keys move
    assert len(moved3) / len(KEYS) == pytest.approx(60 / 130 - 0.30, abs=SHARE_TOLERANCE)


def test_an_arm_out_of_service_loses_only_its_own_keys() -> None:
    exp = experiment({"a": 40, "b": 30, "c": 30})
    rng = random.Random(0)
    before = {key: choose_arm(exp, exp.weights, key, None, (), rng).name for key in KEYS[:5000]}
    after = {key: choose_arm(exp, exp.weights, key, None, {"b"}, rng).name for key in KEYS[:5000]}
    assert all(after[key] == before[key] for key in before if before[key] != "b")
    assert "b" not in after.values()


def test_override_pins_an_arm_even_one_out_of_service() -> None:
    exp = experiment({"a": 1, "b": 1})
    rng = random.Random(0)
    assert {choose_arm(exp, exp.weights, key, "b", {"b"}, rng).name for key in KEYS[:100]} == {"b"}
    with pytest.raises(BadRequest, match=re.escape("has no arm 'z' (arms: a, b)")):
        choose_arm(exp, exp.weights, None, "z", (), rng)
    with pytest.raises(UpstreamUnavailable, match="out of service: a, b"):
        choose_arm(exp, exp.weights, "k", None, {"a", "b"}, rng)


def test_a_zero_weight_drains_an_arm() -> None:
    exp = with_weights(experiment({"a": 1, "b": 1}), {"b": 0})
    assert {choose_arm(exp, exp.weights, key, None, (), random.Random(0)).name for key in KEYS[:500]} == {"a"}
    with pytest.raises(ConfigError, match="at least one arm needs a weight > 0"):
        with_weights(exp, {"a": 0})
    with pytest.raises(ConfigError, match="has no arm 'q'"):
        with_weights(exp, {"q": 1})


VALID: dict[str, Any] = {"experiments": {"fashion": {"arms": {
    "full": {"model": "fashion-full", "version": "1.0", "weight": 3},
    "int8": {"model": "fashion-int8", "weight": 1}}}}}


def changed(path: str, value: Any) -> dict[str, Any]:
    import copy

    document = copy.deepcopy(VALID)
    node = document
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return document


@pytest.mark.parametrize(("document", "message"), [
    (changed("experiments.fashion.arms.int8.weight", -1), "experiments.fashion.arms.int8.weight: must be a number > 0"),
    (changed("experiments.fashion.arms.int8.weight", 0), "arms.int8.weight: must be a number > 0, got 0"),
    (changed("experiments.fashion.arms.int8.weight", "heavy"), "arms.int8.weight: must be a number"),
    (changed("experiments.fashion.arms.int8.wieght", 1), "experiments.fashion.arms.int8: unknown key 'wieght'"),
    (changed("experiments.fashion.colour", "red"), "experiments.fashion: unknown key 'colour'"),
    (changed("listen.prot", 1), "listen: unknown key 'prot'"),
    (changed("experiments.fashion.control", "pruned"), "control: 'pruned' is not one of its arms"),
    (changed("experiments.fashion.shadow", {"model": "m", "sample": 1.5}), "shadow.sample: must be a number > 0"),
    (changed("experiments.fashion.guardrail", {"window_s": 5}), "set max_error_rate, max_p99_ms or both"),
    (changed("experiments.fashion.arms", {}), "experiments.fashion.arms: needs a mapping of at least one arm"),
    ({"experiments": {}}, "experiments: needs at least one experiment"),
    (changed("headers", {"sticky": "X-A", "override": "x-a"}), "must differ"),
])
def test_invalid_config_names_the_offending_entry(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert message in str(error.value)


def test_targets_are_checked_against_what_torchserve_serves() -> None:
    config = parse_config(VALID)
    assert config.experiments["fashion"].arms[1].target == Target("fashion-int8", None)
    check_targets(config, {"fashion-full": {"1.0"}, "fashion-int8": {"1.0", "2.0"}})
    with pytest.raises(ConfigError, match=re.escape("arms.int8: TorchServe serves no model 'fashion-int8'")):
        check_targets(config, {"fashion-full": {"1.0"}})
    with pytest.raises(ConfigError, match=re.escape("arms.full: fashion-full has no version '1.0' (it has: 2.0)")):
        check_targets(config, {"fashion-full": {"2.0"}, "fashion-int8": {"1.0"}})


def test_percentiles_match_numpy() -> None:
    values = list(np.random.default_rng(0).exponential(10, size=1001))
    for q in (50, 95, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_wilson_interval_against_known_values() -> None:
    low, high = wilson_interval(0, 10) or (math.nan, math.nan)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(81, 263) or (math.nan, math.nan)
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    assert wilson_interval(0, 0) is None


def test_circuit_breaker_opens_after_consecutive_failures_and_sends_one_probe_when_half_open() -> None:
    breaker = CircuitBreaker(failures=3, reset_s=10)
    assert not breaker.failure(0.0) and not breaker.failure(1.0)
    breaker.success()  # a success resets the count
    assert not breaker.failure(2.0) and not breaker.failure(3.0)
    assert breaker.failure(4.0) and breaker.state(4.0) == "open" and not breaker.available(13.9)
    assert breaker.state(14.1) == "half-open" and breaker.available(14.1)
    breaker.attempt(14.1)  # the probe
    assert not breaker.available(14.2)  # nobody else while the probe is out
    assert breaker.available(24.2)  # unless the probe never came back
    assert breaker.failure(14.5) and breaker.state(14.5) == "open"  # a failed probe opens it again
    assert breaker.state(24.6) == "half-open"
    breaker.attempt(24.6)
    assert breaker.success() and breaker.state(24.7) == "closed" and breaker.available(24.7)


def test_labels_of_reads_only_our_handlers_answers() -> None:
    assert labels_of(Reply(200, b'{"label": 7, "class": "Sneaker"}')) == (7,)
    assert labels_of(Reply(400, b'{"error": {"code": 400}}')) is None
    assert labels_of(Reply(200, b'{"label": true}')) is None
    assert labels_of(Reply(200, b"not json")) is None
    v2 = {"id": "", "outputs": [{"name": "class", "datatype": "BYTES", "shape": [2], "data": ["Bag", "Coat"]},
                                {"name": "label", "datatype": "INT64", "shape": [2], "data": [8, 4]}]}
    assert labels_of(Reply(200, json.dumps(v2).encode())) == (8, 4)  # an Open Inference Protocol answer: one per image
    assert single_label((8, 4)) is None and single_label((8,)) == 8 and single_label(None) is None
    v2["outputs"][1]["data"] = [8, "4"]
    assert labels_of(Reply(200, json.dumps(v2).encode())) is None
