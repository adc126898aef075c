"""Router: the live route table, variant choice per request, per-variant statistics and bandit rewards.

Each endpoint's route is compiled once (chooser, stats) into a `CompiledRoute`; applying a route replaces the
dictionary entry in one assignment, so a request sees the old route or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.records import PayloadPolicy
from gateway.routing.strategies import BanditChooser, Chooser, StickyChooser, WeightedChooser
from gateway.routing.table import Route, Variant

_LATENCY_WINDOW = 4096  # recent requests per variant behind p50/p99
_REMEMBERED_ANSWERS = 100_000  # bandit: request id -> (variant, prediction), for rewards that arrive later


@dataclass
class VariantStats:
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))

    def record(self, status: int, latency_ms: float) -> None:
        self.requests += 1
        if status >= 400:
            self.errors += 1
        self.latencies_ms.append(latency_ms)

    def summary(self) -> dict[str, Any]:
        p50 = p99 = None
        if self.latencies_ms:
            p50, p99 = (float(v) for v in np.percentile(np.fromiter(self.latencies_ms, float), [50, 99]))
        return {"requests": self.requests, "errors": self.errors, "p50_ms": p50, "p99_ms": p99}


@dataclass
class CompiledRoute:
    endpoint: str
    route: Route
    chooser: Chooser
    stats: dict[str, VariantStats]
    policy: PayloadPolicy | None
    fingerprint: str = ""
    """Identifies the route's content, the same in every process: statistics merge only within one route."""

    def pick(self, request_id: str, headers: Mapping[str, str]) -> tuple[int, Variant]:
        key: str | None = None
        if self.route.sticky == "id":
            key = request_id
        elif (header := self.route.sticky_header) is not None:
            key = headers.get(header)
        index = self.chooser.choose(key)
        return index, self.route.variants[index]


def compile_route(endpoint: str, route: Route, default_policy: PayloadPolicy) -> CompiledRoute:
    names = [v.name for v in route.variants]
    weights = [v.weight for v in route.variants]
    chooser: Chooser
    if route.strategy == "bandit":
        chooser = BanditChooser(len(names), route.bandit)
    elif route.sticky:
        chooser = StickyChooser(names, weights)
    else:
        chooser = WeightedChooser(weights)
    policy = None
    if route.log is not None:
        # Inputs redacted gateway-wide stay redacted on every endpoint; the route adds to them. Its sample rate
        # applies where it sets one.
        sample = default_policy.sample if route.log.sample is None else route.log.sample
        redact = default_policy.redact | frozenset(route.log.redact)
        policy = PayloadPolicy(sample, redact, default_policy.max_tensor_bytes)
    stats = {name: VariantStats() for name in names}
    fingerprint = hashlib.sha256(route.model_dump_json().encode()).hexdigest()[:16]
    return CompiledRoute(endpoint, route, chooser, stats, policy, fingerprint)


class Router:
    def __init__(
        self, default_policy: PayloadPolicy, on_apply: Callable[[str, Route], None] | None = None
    ) -> None:
        self._routes: dict[str, CompiledRoute] = {}
        self._default_policy = default_policy
        self._on_apply = on_apply  # told of every route put in place (the shadow metrics' series start at 0)
        self._answers: OrderedDict[str, tuple[str, str, list[Any]]] = OrderedDict()

    def get(self, endpoint: str) -> CompiledRoute | None:
        return self._routes.get(endpoint)

    def endpoints(self) -> dict[str, Route]:
        return {name: compiled.route for name, compiled in sorted(self._routes.items())}

    def apply(self, endpoint: str, route: Route) -> None:
        current = self._routes.get(endpoint)
        if current is not None and current.route == route:
            return  # unchanged: keep its statistics and bandit state
        self._routes[endpoint] = compile_route(endpoint, route, self._default_policy)
        if self._on_apply is not None:
            self._on_apply(endpoint, route)

    def remove(self, endpoint: str) -> bool:
        return self._routes.pop(endpoint, None) is not None

    def policy_for(self, endpoint: str) -> PayloadPolicy:
        compiled = self._routes.get(endpoint)
        return compiled.policy if compiled is not None and compiled.policy is not None else self._default_policy

    # -- bandit rewards --------------------------------------------------------------------------------

    def remember(self, endpoint: str, request_id: str, variant: str, predictions: list[Any]) -> None:
        """Keep what a bandit variant answered, so a label arriving later can be scored against it.

        The variant is kept by name: a PUT may reorder the variants before the reward arrives.
        """
        self._answers[request_id] = (endpoint, variant, predictions)
        if len(self._answers) > _REMEMBERED_ANSWERS:
            self._answers.popitem(last=False)

    def reward(self, endpoint: str, request_id: str, label: object, reward: float | None) -> bool:
        """Credit the variant that answered `request_id`; False when the answer is unknown here."""
        compiled = self._routes.get(endpoint)
        remembered = self._answers.get(request_id)
        if compiled is None or remembered is None or remembered[0] != endpoint:
            return False
        if not isinstance(compiled.chooser, BanditChooser):
            return False
        _, name, predictions = remembered
        index = next((i for i, v in enumerate(compiled.route.variants) if v.name == name), None)
        value = reward if reward is not None else label_reward(label, predictions)
        if value is None or index is None:
            return False
        compiled.chooser.reward(index, value)
        return True

    def stats(self, endpoint: str) -> dict[str, Any] | None:
        compiled = self._routes.get(endpoint)
        if compiled is None:
            return None
        variants: dict[str, Any] = {}
        for index, variant in enumerate(compiled.route.variants):
            summary = compiled.stats[variant.name].summary()
            if isinstance(compiled.chooser, BanditChooser):
                arm = compiled.chooser.arms[index]
                summary |= {"reward_mean": arm.reward_mean, "pulls": arm.pulls}
            variants[variant.name] = summary
        return {"endpoint": endpoint, "strategy": compiled.route.strategy, "variants": variants}


def label_reward(label: object, predictions: list[Any]) -> float | None:
    """1 for a correct prediction, 0 for a wrong one; the share correct when label is a list per row."""
    labels = label if isinstance(label, list) else [label]
    if not predictions or len(labels) != len(predictions):
        return None
    return sum(1.0 for a, b in zip(labels, predictions, strict=True) if _same(a, b)) / len(labels)


def _same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return str(a) == str(b)


def predictions_of(outputs: list[tuple[str, np.ndarray]]) -> list[Any]:
    """Per-row predictions: an integer (or string) label output if the model has one, else argmax of the first."""
    for _, array in outputs:
        if array.dtype.kind in "iuOUS" and array.ndim >= 1 and array.size == array.shape[0]:
            return [v.item() if hasattr(v, "item") else v for v in array.reshape(-1)]
    if not outputs:
        return []
    first = outputs[0][1]
    if first.ndim == 2 and first.shape[1] > 1:
        return [int(i) for i in first.argmax(axis=1)]
    return [float(v) for v in first.reshape(first.shape[0], -1)[:, 0]] if first.ndim >= 1 else []
