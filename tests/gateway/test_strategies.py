"""Routing strategies, the router and the route schema, in-process (design.md, "Admin API").

Statistical claims are checked with fixed seeds, so each is deterministic: the weighted split passes a
chi-squared goodness-of-fit test, sticky (weighted rendezvous) hashing keeps keys put and moves only the keys a
weight change must move, and the bandit finds the better variant while keeping its exploration floor.
Each statistical check is paired with a control showing the same test rejects a wrong hypothesis.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from scipy.stats import chisquare

from gateway.errors import GatewayError
from gateway.records import PayloadPolicy
from gateway.routing.router import Router, compile_route, label_reward, predictions_of
from gateway.routing.shadow import disagrees
from gateway.routing.strategies import BanditChooser, StickyChooser, WeightedChooser, unit_hash
from gateway.routing.table import BanditSettings, InvalidRoute, Route, parse_route

ALPHA = 0.001  # the significance level for the split tests


def goodness_of_fit(counts: Counter[int], weights: Sequence[float]) -> float:
    """p-value of `counts` (index -> observations) against the split `weights`."""
    n = sum(counts.values())
    observed = [counts.get(i, 0) for i in range(len(weights))]
    expected = [n * w / sum(weights) for w in weights]
    return float(chisquare(observed, expected).pvalue)


def route(**fields: Any) -> Route:
    base: dict[str, Any] = {
        "variants": [
            {"name": "a", "model": "tabular", "version": 1},
            {"name": "b", "model": "tabular", "version": 2},
        ]
    }
    return parse_route("fraud", base | fields)


# -- weighted ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "seed"), [([90, 10], 11), ([50, 30, 20], 12), ([0.7, 0.2, 0.1], 13)])
def test_weighted_split_passes_chi_squared(weights: list[float], seed: int) -> None:
    chooser = WeightedChooser(weights, random.Random(seed))
    counts = Counter(chooser.choose() for _ in range(10_000))
    p_value = goodness_of_fit(counts, weights)
    print(f"weighted {weights}: counts {sorted(counts.items())}, chi-squared p = {p_value:.4f}")
    assert set(counts) == set(range(len(weights)))
    assert p_value > ALPHA
    # Control: the same draws are nowhere near a uniform split, so the test above has power.
    assert goodness_of_fit(counts, [1.0] * len(weights)) < 1e-6


def test_weighted_chooser_never_picks_outside_the_variants() -> None:
    # Weights are relative: any finite positive values, even ones whose sum overflows a float, pick a variant.
    for weights in ([1.0], [1e-300, 1.0], [1e308, 1e308], [1e308, 1e308, 1.0]):
        chooser = WeightedChooser(weights, random.Random(1))
        picks = Counter(chooser.choose() for _ in range(2000))
        assert set(picks) <= set(range(len(weights))), (weights, picks)
    overflowing = WeightedChooser([1e308, 1e308], random.Random(2))
    huge = Counter(overflowing.choose() for _ in range(2000))
    assert 800 < huge[0] < 1200  # still an even split


# -- sticky -------------------------------------------------------------------------------------------------


def sticky_assignments(names: list[str], weights: list[float], keys: Sequence[str]) -> list[int]:
    chooser = StickyChooser(names, weights)
    return [chooser.choose(key) for key in keys]


def test_sticky_key_always_gets_one_variant_and_split_follows_weights() -> None:
    keys = [f"user-{i}" for i in range(30_000)]
    names, weights = ["a", "b", "c"], [50.0, 30.0, 20.0]
    first = sticky_assignments(names, weights, keys)
    again = StickyChooser(names, weights, random.Random(99))  # another instance, another fallback RNG
    assert [again.choose(key) for key in keys] == first
    assert all(again.choose(key) == first[i] for i in range(0, 30_000, 97) for key in [keys[i]] * 5)
    p_value = goodness_of_fit(Counter(first), weights)
    print(f"sticky 50/30/20 over 30,000 keys: chi-squared p = {p_value:.4f}")
    assert p_value > ALPHA
    assert goodness_of_fit(Counter(first), [1.0, 1.0, 1.0]) < 1e-6


def test_sticky_weight_change_moves_only_keys_that_must_move() -> None:
    keys = [f"user-{i}" for i in range(100_000)]
    before = sticky_assignments(["a", "b"], [50, 50], keys)
    after = sticky_assignments(["a", "b"], [60, 40], keys)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    share = len(moved) / len(keys)
    print(f"sticky 50/50 -> 60/40: {share:.2%} of 100,000 keys moved")
    # Weighted rendezvous hashing is minimally disruptive: exactly the 10 % that b must give up move, all to a.
    assert 0.09 < share < 0.11
    assert share <= 0.15
    assert set(moved) == {(1, 0)}
    assert abs(after.count(0) / len(keys) - 0.6) < 0.01


def test_sticky_adding_a_variant_moves_keys_only_to_it() -> None:
    keys = [f"k{i}" for i in range(20_000)]
    before = sticky_assignments(["a", "b"], [1, 1], keys)
    after = sticky_assignments(["a", "b", "c"], [1, 1, 1], keys)
    changed = {(b, a) for b, a in zip(before, after, strict=True) if b != a}
    assert changed == {(0, 2), (1, 2)}
    assert abs(after.count(2) / len(keys) - 1 / 3) < 0.015
    # Reordering the variants does not move anyone: a key follows the variant's name, not its position.
    reordered = sticky_assignments(["b", "a"], [1, 1], keys)
    assert [1 - i for i in reordered] == before


def test_sticky_hash_is_stable_across_processes() -> None:
    """Replicas and restarts agree: the digest is keyed BLAKE2b, not Python's per-process salted hash()."""
    keys = [f"user-{i}" for i in range(200)]
    local = sticky_assignments(["a", "b", "c"], [5, 3, 2], keys)
    script = (
        "import json, sys\n"
        "from gateway.routing.strategies import StickyChooser, unit_hash\n"
        "keys = json.loads(sys.stdin.read())\n"
        "chooser = StickyChooser(['a', 'b', 'c'], [5, 3, 2])\n"
        "print(json.dumps({'picks': [chooser.choose(k) for k in keys], 'u': unit_hash(keys[0], 'a')}))\n"
    )
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(keys), capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed}, cwd=os.getcwd(),
        )
        remote = json.loads(result.stdout)
        assert remote["picks"] == local
        assert remote["u"] == unit_hash(keys[0], "a")
    assert 0.0 < unit_hash("", "") < 1.0
    assert unit_hash("k", "a") != unit_hash("k", "b") != unit_hash("k2", "b")


def test_sticky_without_key_falls_back_to_the_weighted_split() -> None:
    chooser = StickyChooser(["a", "b"], [90, 10], random.Random(5))
    counts = Counter(chooser.choose(None) for _ in range(10_000))
    assert goodness_of_fit(counts, [90, 10]) > ALPHA


# -- bandit -------------------------------------------------------------------------------------------------


def run_bandit(settings: BanditSettings, probabilities: list[float], rounds: int, seed: int) -> list[int]:
    """Serve `rounds` requests; each answered request's reward ~ Bernoulli(probabilities[variant])."""
    rng = random.Random(seed)
    chooser = BanditChooser(len(probabilities), settings, random.Random(seed + 1))
    picks: list[int] = []
    for _ in range(rounds):
        index = chooser.choose()
        chooser.reward(index, 1.0 if rng.random() < probabilities[index] else 0.0)
        picks.append(index)
    return picks


@pytest.mark.parametrize("algorithm", ["thompson", "epsilon_greedy"])
def test_bandit_converges_to_the_better_variant(algorithm: str) -> None:
    settings = BanditSettings(algorithm=algorithm)
    picks = run_bandit(settings, [0.1, 0.9], rounds=2000, seed=21)
    share = picks[-500:].count(1) / 500
    print(f"{algorithm}: better variant got {share:.1%} of the last 500 of 2,000")
    assert share > 0.8
    # The exploration floor: the worse variant still gets traffic (min_share 0.05 -> about 5 % or more).
    assert picks[-1000:].count(0) / 1000 >= 0.03


def test_bandit_min_share_floor_holds_when_one_variant_is_hopeless() -> None:
    settings = BanditSettings(algorithm="thompson", min_share=0.2)
    picks = run_bandit(settings, [0.0, 1.0, 0.0], rounds=3000, seed=31)
    tail = Counter(picks[-1500:])
    for worse in (0, 2):
        assert tail[worse] / 1500 >= 0.17, tail  # >= min_share (0.2) up to sampling noise
    assert tail[1] / 1500 > 0.35


def test_bandit_stats_count_pulls_and_clip_rewards() -> None:
    chooser = BanditChooser(2, BanditSettings(), random.Random(3))
    picks = Counter(chooser.choose() for _ in range(100))
    assert [arm.pulls for arm in chooser.arms] == [picks[0], picks[1]]
    assert chooser.arms[0].reward_mean is None
    for value in (5.0, -3.0, 1.0):  # out-of-range rewards are averaged as given, clipped for the posterior
        chooser.reward(0, value)
    assert chooser.arms[0].reward_mean == pytest.approx(1.0)
    assert all(chooser.choose() in (0, 1) for _ in range(200))


# -- router -------------------------------------------------------------------------------------------------


def bandit_route(*names: str) -> Route:
    return parse_route(
        "fraud",
        {"strategy": "bandit", "variants": [{"name": n, "model": "tabular", "version": 1} for n in names]},
    )


def test_router_rewards_by_label_against_the_remembered_prediction() -> None:
    router = Router(PayloadPolicy())
    router.apply("fraud", bandit_route("a", "b"))
    router.remember("fraud", "r1", "a", [1])
    router.remember("fraud", "r2", "a", [0])
    router.remember("fraud", "r3", "b", [1, 0, 1, 1])
    assert router.reward("fraud", "r1", 1, None)  # correct: 1
    assert router.reward("fraud", "r2", 1, None)  # wrong: 0
    assert router.reward("fraud", "r3", [1, 1, 1, 0], None)  # half of the rows right
    assert not router.reward("fraud", "unknown-id", 1, None)
    assert not router.reward("other", "r1", 1, None)  # another endpoint's request id
    assert not router.reward("fraud", "r1", [1, 0], None)  # label rows do not match the prediction rows
    stats = router.stats("fraud")
    assert stats is not None
    assert stats["variants"]["a"]["reward_mean"] == pytest.approx(0.5)
    assert stats["variants"]["b"]["reward_mean"] == pytest.approx(0.5)
    assert router.reward("fraud", "r1", None, 0.25)  # an explicit reward wins over the label
    stats = router.stats("fraud")
    assert stats is not None and stats["variants"]["a"]["reward_mean"] == pytest.approx(1.25 / 3)


def test_router_reward_follows_the_variant_name_when_a_route_is_reordered() -> None:
    """A reward that arrives after a PUT reordered the variants is credited to the variant that answered."""
    router = Router(PayloadPolicy())
    router.apply("fraud", bandit_route("a", "b"))
    router.remember("fraud", "r1", "a", [1])  # answered by "a"
    router.apply("fraud", bandit_route("b", "a"))
    assert router.reward("fraud", "r1", None, 1.0)
    stats = router.stats("fraud")
    assert stats is not None
    assert stats["variants"]["a"]["reward_mean"] == 1.0
    assert stats["variants"]["b"]["reward_mean"] is None
    router.apply("fraud", bandit_route("c", "d"))  # the variant is gone: nothing to credit
    router.remember("fraud", "r2", "c", [1])
    router.apply("fraud", bandit_route("e", "f"))
    assert not router.reward("fraud", "r2", None, 1.0)


def test_router_keeps_state_for_an_unchanged_route_and_resets_on_change() -> None:
    router = Router(PayloadPolicy())
    router.apply("fraud", bandit_route("a", "b"))
    compiled = router.get("fraud")
    assert compiled is not None
    for _ in range(10):
        index, variant = compiled.pick("id", {})
        compiled.stats[variant.name].record(200, 1.0)
    router.apply("fraud", bandit_route("a", "b"))  # the same route again (e.g. the pub/sub echo): kept
    assert router.get("fraud") is compiled
    stats = router.stats("fraud")
    assert stats is not None
    assert sum(v["pulls"] for v in stats["variants"].values()) == 10
    assert sum(v["requests"] for v in stats["variants"].values()) == 10
    router.apply("fraud", route())  # a different route: fresh statistics, no bandit fields
    stats = router.stats("fraud")
    assert stats is not None and stats["strategy"] == "weighted"
    assert stats["variants"]["a"] == {"requests": 0, "errors": 0, "p50_ms": None, "p99_ms": None}
    assert router.remove("fraud") and not router.remove("fraud")
    assert router.stats("fraud") is None and router.get("fraud") is None


def test_router_non_bandit_route_takes_no_reward() -> None:
    router = Router(PayloadPolicy())
    router.apply("fraud", route())
    router.remember("fraud", "r1", "a", [1])
    assert not router.reward("fraud", "r1", 1, None)


def test_variant_stats_percentiles_and_errors() -> None:
    router = Router(PayloadPolicy())
    router.apply("fraud", route())
    compiled = router.get("fraud")
    assert compiled is not None
    for latency in range(1, 101):
        compiled.stats["a"].record(200 if latency % 10 else 500, float(latency))
    stats = router.stats("fraud")
    assert stats is not None
    a = stats["variants"]["a"]
    assert (a["requests"], a["errors"]) == (100, 10)
    assert a["p50_ms"] == pytest.approx(50.5)
    assert a["p99_ms"] == pytest.approx(99.01)


def test_pick_uses_the_sticky_header_or_request_id() -> None:
    router = Router(PayloadPolicy())
    router.apply("e", route(sticky="header:X-User-Id"))
    by_header = router.get("e")
    assert by_header is not None
    picks = {by_header.pick(f"req-{i}", {"x-user-id": "alice"})[1].name for i in range(50)}
    assert len(picks) == 1
    router.apply("e", route(sticky="id"))
    by_id = router.get("e")
    assert by_id is not None
    assert len({by_id.pick("same-id", {})[1].name for _ in range(50)}) == 1
    assert len({by_id.pick(f"id-{i}", {})[1].name for i in range(200)}) == 2


def test_label_reward_and_predictions_of() -> None:
    assert label_reward(1, [1]) == 1.0
    assert label_reward("1", [1]) == 1.0
    assert label_reward([1, 0], [1, 1]) == 0.5
    assert label_reward(1, [1, 1]) is None
    assert label_reward(1, []) is None
    probabilities = np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)
    label = np.array([1, 0], np.int64)
    assert predictions_of([("probabilities", probabilities), ("label", label)]) == [1, 0]
    assert predictions_of([("probabilities", probabilities)]) == [1, 0]
    assert predictions_of([("y", np.array([[1.5], [2.5]], np.float32))]) == [1.5, 2.5]
    assert predictions_of([]) == []


def test_shadow_disagreement_rules() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    assert not disagrees({"p": probs}, {"p": probs + 0.05}, 1e-6)  # same argmax per row
    assert disagrees({"p": probs}, {"p": probs[:, ::-1]}, 1e-6)
    assert disagrees({"l": np.array([1, 0])}, {"l": np.array([1, 1])}, 1e-6)
    assert not disagrees({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.0 + 1e-7])}, 1e-6)
    assert disagrees({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.1])}, 0.05)
    assert disagrees({"y": np.zeros((2, 1))}, {"y": np.zeros((3, 1))}, 1.0)
    assert not disagrees({"y": np.zeros(2)}, {"other": np.ones(2)}, 0.0)  # nothing in common to compare
    # A regression model with several output columns (meta.json task: regression): every value against tolerance.
    several = np.array([[1.0, 2.0, 3.0]])
    assert disagrees({"y": several}, {"y": several + 0.5}, 1e-6, regression=True)
    assert not disagrees({"y": several}, {"y": several + 0.5}, 1e-6)  # read as class scores: same argmax
    assert not disagrees({"y": several}, {"y": several + 0.5}, 0.6, regression=True)


# -- route schema -----------------------------------------------------------------------------------------


def variants(*specs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": "tabular"} | spec for spec in specs]


INVALID_ROUTES: dict[str, tuple[object, str]] = {
    "no variants": ({"variants": []}, "variants"),
    "variants missing": ({"strategy": "weighted"}, "variants"),
    "zero weight": ({"variants": variants({"name": "a", "weight": 0})}, "weight"),
    "negative weight": ({"variants": variants({"name": "a", "weight": -1})}, "weight"),
    "infinite weight": ({"variants": variants({"name": "a", "weight": float("inf")})}, "weight"),
    "duplicate names": ({"variants": variants({"name": "a"}, {"name": "a"})}, "duplicate"),
    "shadow reuses a name": (
        {"variants": variants({"name": "a"}), "shadow": [{"name": "a", "model": "tabular"}]}, "duplicate"
    ),
    "sticky scheme": ({"variants": variants({"name": "a"}), "sticky": "cookie:session"}, "sticky"),
    "sticky empty header": ({"variants": variants({"name": "a"}), "sticky": "header:"}, "sticky"),
    "strategy": ({"variants": variants({"name": "a"}), "strategy": "round_robin"}, "strategy"),
    "bandit of one": ({"variants": variants({"name": "a"}), "strategy": "bandit"}, "two variants"),
    "min_share too big": (
        {"variants": variants({"name": "a"}, {"name": "b"}), "bandit": {"min_share": 0.6}}, "min_share"
    ),
    "shadow sample > 1": ({"variants": variants({"name": "a"}), "shadow": [
        {"name": "s", "model": "tabular", "sample": 1.5}]}, "sample"),
    "unknown field": ({"variants": variants({"name": "a"}), "weights": [1]}, "weights"),
    "not a mapping": (["a", "b"], "route"),
    "null": (None, "route"),
}


@pytest.mark.parametrize("case", sorted(INVALID_ROUTES))
def test_invalid_routes_are_refused_with_422(case: str) -> None:
    raw, mentioned = INVALID_ROUTES[case]
    with pytest.raises(InvalidRoute) as raised:
        parse_route("fraud", raw)
    assert raised.value.status_code == 422
    assert isinstance(raised.value, GatewayError)
    assert mentioned in raised.value.message


def test_invalid_endpoint_name_is_refused() -> None:
    for name in ("", "-leading-dash", "has space", "x" * 129, "slash/inside"):
        with pytest.raises(InvalidRoute):
            parse_route(name, {"variants": variants({"name": "a"})})


def test_route_defaults_and_sticky_header() -> None:
    parsed = parse_route("fraud", {"variants": variants({"name": "a"}), "sticky": "header:X-User-Id"})
    assert parsed.strategy == "weighted"
    assert parsed.variants[0].version == "champion" and parsed.variants[0].weight == 1.0
    assert parsed.sticky_header == "x-user-id"
    assert parse_route("fraud", {"variants": variants({"name": "a"}), "sticky": "id"}).sticky_header is None
    assert parsed.bandit == BanditSettings(algorithm="thompson", epsilon=0.1, min_share=0.05)
    # A stored route (Redis holds model_dump_json) parses back to an equal route: replicas compare equal.
    assert parse_route("fraud", json.loads(parsed.model_dump_json())) == parsed


def test_a_routes_log_block_adds_to_the_gateway_policy_and_samples_only_where_it_says() -> None:
    gateway_wide = PayloadPolicy(sample=0.25, redact=frozenset({"ssn"}), max_tensor_bytes=1024)
    variants = [{"name": "a", "model": "m", "version": 1}]

    def policy(log: dict[str, Any]) -> PayloadPolicy | None:
        return compile_route("ep", parse_route("ep", {"variants": variants, "log": log}), gateway_wide).policy

    assert policy({"redact": ["email"]}) == PayloadPolicy(0.25, frozenset({"ssn", "email"}), 1024)
    assert policy({"sample": 1.0}) == PayloadPolicy(1.0, frozenset({"ssn"}), 1024)
    assert compile_route("ep", parse_route("ep", {"variants": variants}), gateway_wide).policy is None
