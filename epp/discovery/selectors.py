"""Kubernetes label selectors: the pool's `matchLabels` and `--endpoint-selector` strings.

One type for both, so the pods a selector picks are the same whether the API server
filters them (the `labelSelector` query of a list or watch) or epp does (a pool file).
The string syntax is Kubernetes' own (`labels.Parse`): `k=v`, `k==v`, `k!=v`,
`k in (a,b)`, `k notin (a,b)`, `k` (exists), `!k` (does not exist), `k>1`, `k<1`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_OPERATORS = ("==", "!=", "=", ">", "<")


class SelectorError(ValueError):
    """A label selector that Kubernetes would refuse too; the message says which part."""


def _check_key(key: str, text: str) -> str:
    prefix, _, name = key.rpartition("/")
    if not name or not _NAME.match(name) or (prefix and (len(prefix) > 253 or not _PREFIX.match(prefix))):
        raise SelectorError(f"invalid label key {key!r} in selector {text!r}")
    return key


def _check_value(value: str, text: str) -> str:
    if not _VALUE.match(value):
        raise SelectorError(f"invalid label value {value!r} in selector {text!r} (at most 63 of A-Z a-z 0-9 - _ .)")
    return value


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a selector: `key op values`."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return has and value in self.values
        if self.op in ("!=", "notin"):
            return not has or value not in self.values
        if self.op == "exists":
            return has
        if self.op == "!":
            return not has
        try:  # ">" and "<" compare integers; a label that is not one does not match
            have, want = int(str(value)), int(self.values[0])
        except ValueError:
            return False
        return has and (have > want if self.op == ">" else have < want)

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!":
            return f"!{self.key}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return f"{self.key}{self.op}{self.values[0]}"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """All requirements must hold. Empty selects everything (callers refuse that where it matters)."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> LabelSelector:
        """`matchLabels` (or a v1alpha2 pool's plain label map): every label must be equal."""
        return cls(tuple(Requirement(str(k), "=", (str(v),)) for k, v in sorted(labels.items())))

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Kubernetes selector syntax, as `kubectl -l` and upstream's `--endpoint-selector` take it."""
        reqs = [_parse_requirement(part.strip(), text) for part in _split_terms(text)]
        return cls(tuple(sorted(reqs, key=lambda r: (r.key, r.op, r.values))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)

    def __str__(self) -> str:
        """The `labelSelector` query value the API server understands."""
        return ",".join(str(r) for r in self.requirements)


def _split_terms(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced ')' in selector {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorError(f"unbalanced '(' in selector {text!r}")
    parts.append(text[start:])
    if not text.strip():
        return []
    if any(not p.strip() for p in parts):
        raise SelectorError(f"empty term in selector {text!r}")
    return parts


def _parse_requirement(term: str, text: str) -> Requirement:
    m = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", term)
    if m:
        values = tuple(sorted({_check_value(v.strip(), text) for v in m.group(3).split(",")}))
        if not m.group(3).strip():
            raise SelectorError(f"{m.group(2)} needs at least one value in selector {text!r}")
        return Requirement(_check_key(m.group(1), text), m.group(2), values)
    if term.startswith("!"):
        return Requirement(_check_key(term[1:].strip(), text), "!")
    for op in _OPERATORS:
        key, found, value = term.partition(op)
        if found:
            key, value = key.strip(), value.strip()
            if op in (">", "<") and not re.fullmatch(r"-?\d+", value):
                raise SelectorError(f"{op} needs an integer in selector {text!r}, got {value!r}")
            return Requirement(_check_key(key, text), "=" if op == "==" else op, (_check_value(value, text),))
    if re.search(r"\s", term):
        raise SelectorError(f"cannot read {term!r} in selector {text!r} (expected key, !key, key=value, "
                            "key!=value, key in (a,b) or key notin (a,b))")
    return Requirement(_check_key(term, text), "exists")
