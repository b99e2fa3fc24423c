"""Which base model a LoRA adapter runs on, from the ConfigMaps body-based routing reads.

Upstream's BBR watches ConfigMaps labelled `inference.networking.k8s.io/bbr-managed:
"true"`, each with `data.baseModel` and `data.adapters` (a YAML list of adapter
names); several ConfigMaps may share a base model. A model name that is an adapter
maps to its base, a base model to itself, anything else to "" (upstream sets the
header empty then, so a route matching on it does not match).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

BBR_MANAGED_LABEL = "inference.networking.k8s.io/bbr-managed"


class BaseModelError(ValueError):
    """A bbr-managed ConfigMap that cannot be read; the message names it."""


@dataclass(frozen=True)
class BaseModels:
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> base model
    bases: frozenset[str] = frozenset()

    def base_of(self, model: str) -> str:
        model = model.strip()
        if model in self.adapters:
            return self.adapters[model]
        return model if model in self.bases else ""

    def __len__(self) -> int:
        return len(self.adapters) + len(self.bases)


def is_bbr_configmap(obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return obj.get("kind") == "ConfigMap" and str(labels.get(BBR_MANAGED_LABEL, "")) == "true"


def from_configmaps(configmaps: Iterable[tuple[dict[str, Any], str]]) -> BaseModels:
    """The mapping the (ConfigMap, where) pairs describe; an adapter under two base models is an error."""
    adapters: dict[str, str] = {}
    owner: dict[str, str] = {}
    bases: set[str] = set()
    for cm, where in configmaps:
        name = str((cm.get("metadata") or {}).get("name") or "")
        data = cm.get("data") or {}
        if not isinstance(data, dict):
            raise BaseModelError(f"{where}: ConfigMap {name}: data must be a mapping")
        base = data.get("baseModel")
        if not isinstance(base, str) or not base.strip():
            raise BaseModelError(f"{where}: ConfigMap {name}: data.baseModel must name the base model")
        base = base.strip()
        bases.add(base)
        raw = data.get("adapters")
        listed: Any = []
        if raw is not None and str(raw).strip():
            try:
                listed = yaml.safe_load(str(raw))
            except yaml.YAMLError as e:
                raise BaseModelError(f"{where}: ConfigMap {name}: data.adapters is not a YAML list: {e}") from None
        if not isinstance(listed, list):
            raise BaseModelError(f"{where}: ConfigMap {name}: data.adapters must be a YAML list of adapter names")
        for item in listed:
            adapter = str(item).strip()
            if not adapter:
                continue
            if adapters.get(adapter, base) != base:
                raise BaseModelError(f"{where}: ConfigMap {name}: adapter {adapter!r} is already listed under base "
                                     f"model {adapters[adapter]!r} (ConfigMap {owner[adapter]})")
            adapters[adapter] = base
            owner[adapter] = name
    return BaseModels(adapters, frozenset(bases))
