"""One small metadata filter language, parsed once and compiled per engine.

Grammar (MongoDB-like)::

    {"lang": "en"}                              equality
    {"year": {"$gte": 2020, "$lt": 2024}}        ranges: $gt $gte $lt $lte (and $eq)
    {"topic": {"$in": ["news", "search"]}}      membership
    {"$and": [f1, f2]}, {"$or": [f1, f2]}        boolean combinations
    {"lang": "en", "topic": "news"}             several keys = $and

Values are str, int, float or bool. Adapters never paste raw values into query
text: they compile the parsed tree, escaping or parameterising every value.

>>> parse_filter({"lang": "en", "year": {"$gte": 2020}})
And(items=(Eq(field='lang', value='en'), Cmp(field='year', op='$gte', value=2020)))
>>> matches(parse_filter({"topic": {"$in": ["a", "b"]}}), {"topic": "b"})
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from .errors import FilterError

__all__ = ["Eq", "In", "Cmp", "And", "Or", "FilterNode", "parse_filter", "matches", "float_comparable"]

Scalar = str | int | float | bool
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RANGE_OPS = ("$gt", "$gte", "$lt", "$lte")


@dataclass(frozen=True)
class Eq:
    field: str
    value: Scalar


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Cmp:
    field: str
    op: str  # one of $gt $gte $lt $lte
    value: int | float


@dataclass(frozen=True)
class And:
    items: tuple[FilterNode, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[FilterNode, ...]


FilterNode = Eq | In | Cmp | And | Or


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, (str, bool, int, float)):
        if isinstance(value, float) and value != value:
            raise FilterError(f"{where}: NaN is not a filter value")
        return value
    raise FilterError(f"{where}: value must be str, int, float or bool, got {type(value).__name__}")


def _field(name: Any) -> str:
    if not isinstance(name, str) or not _FIELD.match(name):
        raise FilterError(
            f"filter field {name!r} is not a plain identifier (letters, digits, underscore)"
        )
    return name


def _parse_condition(field: str, cond: Any) -> FilterNode:
    if not isinstance(cond, Mapping):
        return Eq(field, _scalar(cond, field))
    if not cond:
        raise FilterError(f"{field}: empty condition")
    parts: list[FilterNode] = []
    for op, value in cond.items():
        if op == "$eq":
            parts.append(Eq(field, _scalar(value, f"{field}.$eq")))
        elif op == "$in":
            if not isinstance(value, (list, tuple)) or not value:
                raise FilterError(f"{field}.$in needs a non-empty list")
            parts.append(In(field, tuple(_scalar(v, f"{field}.$in") for v in value)))
        elif op in _RANGE_OPS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FilterError(f"{field}.{op} needs a number, got {value!r}")
            parts.append(Cmp(field, op, value))
        else:
            raise FilterError(f"{field}: unknown operator {op!r}; use $eq $in $gt $gte $lt $lte")
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def parse_filter(spec: Mapping[str, Any] | None) -> FilterNode | None:
    """Validate a filter dict and return its tree (``None`` for no filter)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise FilterError(f"filter must be a dict, got {type(spec).__name__}")
    parts: list[FilterNode] = []
    for key, value in spec.items():
        if key in ("$and", "$or"):
            if not isinstance(value, (list, tuple)) or not value:
                raise FilterError(f"{key} needs a non-empty list of filters")
            items = []
            for j, sub in enumerate(value):
                node = parse_filter(sub)
                if node is None:
                    raise FilterError(f"{key}[{j}] is an empty filter")
                items.append(node)
            parts.append(And(tuple(items)) if key == "$and" else Or(tuple(items)))
        elif isinstance(key, str) and key.startswith("$"):
            raise FilterError(f"unknown operator {key!r} at the top level; use $and or $or")
        else:
            parts.append(_parse_condition(_field(key), value))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _compare(left: Any, op: str, right: float) -> bool:
    if isinstance(left, bool) or not isinstance(left, (int, float)):
        return False
    return {"$gt": left > right, "$gte": left >= right, "$lt": left < right, "$lte": left <= right}[op]


def matches(node: FilterNode | None, metadata: Mapping[str, Any]) -> bool:
    """Evaluate a parsed filter on one metadata dict (the semantics every engine must match)."""
    if node is None:
        return True
    if isinstance(node, Eq):
        return node.field in metadata and _same(metadata[node.field], node.value)
    if isinstance(node, In):
        return node.field in metadata and any(_same(metadata[node.field], v) for v in node.values)
    if isinstance(node, Cmp):
        return node.field in metadata and _compare(metadata[node.field], node.op, node.value)
    if isinstance(node, And):
        return all(matches(n, metadata) for n in node.items)
    return any(matches(n, metadata) for n in node.items)


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but not in any engine: compare bools only with bools.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def float_comparable(value: object) -> TypeGuard[int | float]:
    """A number that a float range compares exactly, so ``2`` can match a stored ``2.0``
    (bools are not numbers here; ints beyond 2**53 must match by value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) <= 2**53
