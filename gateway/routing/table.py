"""Routes: which model versions serve an endpoint (the schema of design.md's admin API), and their validation.

A route is parsed by pydantic (shape and local rules: weights > 0, unique names, sticky syntax), then checked
against what is loaded (every model/version/alias resolves; shadows take the primary's inputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import GatewayError
from gateway.protocol.codecs import TensorSpec

Strategy = Literal["weighted", "bandit"]
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_STICKY = re.compile(r"^(id|header:[A-Za-z0-9\-_]+)$")


class InvalidRoute(GatewayError):
    status_code = 422


class _Strict(BaseModel):
    # Not pydantic's strict mode: YAML 1.1 reads `1e-6` (no decimal point) as a string, which must still be a number.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _version_ref(value: object) -> object:
    """`"2"` means version 2, as in `/versions/2`; other strings are aliases or `latest`."""
    if isinstance(value, bool):
        raise ValueError("version must be a version number, an alias or 'latest', not a boolean")
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value


def _not_boolean(value: object) -> object:
    """A boolean is a mistake to report (422), not the number pydantic would make of it (true -> 1.0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_not_boolean)]


class Variant(_Strict):
    name: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1)
    version: Annotated[int | str, BeforeValidator(_version_ref)] = "champion"
    weight: Number = Field(default=1.0, gt=0, allow_inf_nan=False)


class ShadowVariant(_Strict):
    name: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1)
    version: Annotated[int | str, BeforeValidator(_version_ref)] = "latest"
    sample: Number = Field(default=1.0, ge=0, le=1)
    tolerance: Number = Field(default=1e-6, ge=0)
    """Max abs difference still counted as agreement, for regression outputs."""


class BanditSettings(_Strict):
    algorithm: Literal["thompson", "epsilon_greedy"] = "thompson"
    epsilon: Number = Field(default=0.1, ge=0, le=1)
    min_share: Number = Field(default=0.05, ge=0, le=1)
    """Exploration floor: each variant gets at least about this share of traffic."""


class LogSettings(_Strict):
    sample: Number | None = Field(default=None, ge=0, le=1)
    """Share of this endpoint's requests whose tensors are logged; unset: the gateway's `log_sample_rate`."""
    redact: list[str] = Field(default_factory=list)
    """Inputs never written for this endpoint, besides the gateway's `log_redact`."""


class Route(_Strict):
    variants: list[Variant] = Field(min_length=1)
    strategy: Strategy = "weighted"
    sticky: str | None = None
    shadow: list[ShadowVariant] = Field(default_factory=list)
    bandit: BanditSettings = Field(default_factory=BanditSettings)
    log: LogSettings | None = None

    @field_validator("sticky")
    @classmethod
    def _sticky_syntax(cls, value: str | None) -> str | None:
        if value is not None and not _STICKY.match(value):
            raise ValueError("sticky must be 'id' or 'header:<header name>'")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Route:
        names = [v.name for v in self.variants] + [s.name for s in self.shadow]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate variant names: {', '.join(duplicates)}")
        if len(self.variants) < 2 and self.strategy == "bandit":
            raise ValueError("a bandit route needs at least two variants")
        if self.sticky and self.strategy == "bandit":
            # A bandit moves keys between variants as it learns: it cannot also keep each key on one variant.
            raise ValueError("sticky routing applies to weighted routes; a bandit route cannot be sticky")
        if self.bandit.min_share * len(self.variants) > 1:
            raise ValueError("bandit.min_share times the number of variants must not exceed 1")
        return self

    @property
    def sticky_header(self) -> str | None:
        return self.sticky.split(":", 1)[1].lower() if self.sticky and self.sticky.startswith("header:") else None


def parse_route(endpoint: str, raw: object) -> Route:
    """A route from a decoded JSON/YAML document; InvalidRoute (422) with every problem listed."""
    if not ENDPOINT_NAME.match(endpoint):
        raise InvalidRoute(f"endpoint name {endpoint!r} must match {ENDPOINT_NAME.pattern}")
    try:
        return Route.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'route'}: {e['msg']}" for e in exc.errors())
        raise InvalidRoute(f"invalid route for {endpoint!r}: {problems}") from exc


Signature = Callable[[str, int | str], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]
"""(model, version ref) -> (inputs, outputs) of the loaded version; raises GatewayError when it does not resolve."""


def check_route(endpoint: str, route: Route, signature: Signature) -> None:
    """Every variant resolves to a loaded version, and all variants and shadows take the same inputs (a client
    cannot know which variant will answer, so a request must suit every one of them)."""
    problems: list[str] = []
    primary_inputs: tuple[TensorSpec, ...] | None = None
    first = ""
    for variant in route.variants:
        try:
            inputs, _ = signature(variant.model, variant.version)
        except GatewayError as exc:
            problems.append(f"variant {variant.name!r}: {exc.message}")
            continue
        if primary_inputs is None:
            primary_inputs, first = inputs, variant.name
        elif _by_name(inputs) != _by_name(primary_inputs):
            problems.append(f"variant {variant.name!r}: its inputs differ from variant {first!r}'s")
    for shadow in route.shadow:
        try:
            inputs, _ = signature(shadow.model, shadow.version)
        except GatewayError as exc:
            problems.append(f"shadow {shadow.name!r}: {exc.message}")
            continue
        if primary_inputs is not None and _by_name(inputs) != _by_name(primary_inputs):
            problems.append(f"shadow {shadow.name!r}: its inputs differ from the primary variants'")
    if problems:
        raise InvalidRoute(f"invalid route for {endpoint!r}: {'; '.join(problems)}")


def _by_name(specs: tuple[TensorSpec, ...]) -> dict[str, tuple[str, int]]:
    return {spec.name: (spec.datatype, len(spec.shape)) for spec in specs}
