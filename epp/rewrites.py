"""Model rewrites: a requested model name mapped to weighted target models (GIE's InferenceModelRewrite).

Used for canary and A/B rollouts of models and LoRA adapters, e.g. `food-review`
-> 90% `food-review-v1`, 10% `food-review-v2`. Precedence as GIE: a rule naming the
model exactly beats a generic rule (no `matches`); among equals the oldest resource
wins, then the first rule in list order. The pick happens before scheduling, so
the scorers (LoRA affinity, prefix cache) see the target model.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule: the models it matches (empty: every model) and its weighted targets."""

    resource: str
    models: frozenset[str]
    targets: tuple[str, ...]
    weights: tuple[int, ...]
    cumulative: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) != len(self.weights):
            raise ValueError("a rewrite rule needs at least one target, each with a weight")
        if any(w < 0 for w in self.weights):
            raise ValueError("rewrite weights must not be negative")
        running, cumulative = 0, []
        for w in self.weights:
            running += w
            cumulative.append(running)
        object.__setattr__(self, "cumulative", tuple(cumulative))

    def choose(self, rng: random.Random) -> str:
        """A target with probability weight / total (uniform when every weight is 0)."""
        if len(self.targets) == 1:
            return self.targets[0]
        total = self.cumulative[-1]
        if total == 0:
            return rng.choice(self.targets)
        return self.targets[bisect.bisect_right(self.cumulative, rng.random() * total)]


class ModelRewrites:
    """All rewrite rules of the pool, indexed for one dict lookup per request."""

    def __init__(self, rules: list[RewriteRule] | None = None, seed: int | None = None) -> None:
        """`rules` in precedence order among equals: oldest resource first, then list order."""
        self.rules = list(rules or [])
        self._exact: dict[str, RewriteRule] = {}
        self._generic: RewriteRule | None = None
        for rule in self.rules:
            if not rule.models:
                self._generic = self._generic or rule
            for model in rule.models:
                self._exact.setdefault(model, rule)
        self.rng = random.Random(seed)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, model: str) -> RewriteRule | None:
        return self._exact.get(model) or self._generic

    def rewrite(self, model: str) -> tuple[str, str] | None:
        """(target model, rewrite resource name), or None when no rule applies."""
        rule = self._exact.get(model) or self._generic
        if rule is None:
            return None
        return rule.choose(self.rng), rule.resource
