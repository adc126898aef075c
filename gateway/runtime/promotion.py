"""Which loaded versions the aliases and `latest` point at, after a registry change.

A target moves (an alias to another version, `latest` to a newer one) only when the new version is loaded and
its signature can stand in for the one it replaces — same inputs (names, datatypes, ranks, fixed sizes) and every
old output still there with its datatype — so that clients and routes keep working across the swap. A refused
move leaves the old target serving, with a reason the manager logs and counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.protocol.codecs import TensorSpec
from gateway.runtime.runner import OnnxRunner


@dataclass(frozen=True)
class Promotion:
    aliases: dict[str, int]
    latest: int | None
    moved: list[str] = field(default_factory=list)  # "champion: v1 -> v3"
    refused: list[str] = field(default_factory=list)  # "champion -> v4: input 'x' is INT64, was FP32"


def incompatibility(old: OnnxRunner, new: OnnxRunner) -> str | None:
    """Why `new` cannot replace `old`, or None when it can."""
    old_inputs, new_inputs = _by_name(old.inputs), _by_name(new.inputs)
    if old_inputs.keys() != new_inputs.keys():
        return f"inputs are {sorted(new_inputs)}, were {sorted(old_inputs)}"
    for name, before in old_inputs.items():
        after = new_inputs[name]
        if after.datatype != before.datatype or len(after.shape) != len(before.shape):
            return f"input {name!r} is {after.datatype} {list(after.shape)}, was {before.datatype} {list(before.shape)}"
        if any(a != b and -1 not in (a, b) for a, b in zip(after.shape, before.shape, strict=True)):
            return f"input {name!r} has shape {list(after.shape)}, was {list(before.shape)}"
    new_outputs = _by_name(new.outputs)
    for name, before in _by_name(old.outputs).items():
        if name not in new_outputs or new_outputs[name].datatype != before.datatype:
            return f"output {name!r} ({before.datatype}) is missing or changed type"
    return None


def promote(
    loaded: Mapping[int, OnnxRunner],
    wanted_aliases: Mapping[str, int],
    current_aliases: Mapping[str, int],
    current_latest: int | None,
) -> Promotion:
    aliases: dict[str, int] = {}
    moved: list[str] = []
    refused: list[str] = []
    for alias, target in sorted(wanted_aliases.items()):
        kept, note = _move(alias, current_aliases.get(alias), target, loaded)
        if kept is not None:
            aliases[alias] = kept
        if note is not None:
            (moved if kept == target else refused).append(note)
    latest = current_latest if current_latest in loaded else None
    if latest is None and loaded:
        # Nothing serves through `latest` yet: it is simply the highest version that loaded (design.md).
        latest = max(loaded)
        moved.append(f"latest: -> v{latest}")
    for version in sorted(v for v in loaded if latest is not None and v > latest):
        kept, note = _move("latest", latest, version, loaded)
        if note is not None:
            (moved if kept == version else refused).append(note)
        latest = kept
    return Promotion(aliases, latest, moved, refused)


def _move(name: str, old: int | None, new: int, loaded: Mapping[int, OnnxRunner]) -> tuple[int | None, str | None]:
    """(the version `name` points at afterwards, a note when something moved or was refused)."""
    if old == new and new in loaded:
        return new, None
    if new not in loaded:
        if old in loaded and old != new:
            return old, f"{name} -> v{new}: that version is not loaded; v{old} keeps serving"
        # Nothing loaded to point at (the version was deleted, refused, or is still loading): the name is unset,
        # and requests that relied on it go to `latest` (the model's default) or get a 404 naming the version.
        return None, f"{name} -> v{new}: that version is not loaded; {name} is unset until it is"
    if old is None or old not in loaded:
        return new, f"{name}: -> v{new}"
    reason = incompatibility(loaded[old], loaded[new])
    if reason is not None:
        return old, f"{name} -> v{new}: {reason}; v{old} keeps serving"
    return new, f"{name}: v{old} -> v{new}"


def _by_name(specs: tuple[TensorSpec, ...]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}
