"""`epp bbr --mapping`: the base models of LoRA adapters from ConfigMap files, re-read on change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from epp.gateway import base_models, manifests
from epp.gateway.base_models import BaseModelError, BaseModels
from epp.gateway.bbr import BodyBasedRouter
from epp.yaml_lines import YamlError, load_documents, where

log = logging.getLogger(__name__)


def read(paths: Sequence[str]) -> BaseModels:
    """Every bbr-managed ConfigMap under `paths` (other objects are skipped)."""
    found: list[tuple[dict[str, Any], str]] = []
    for f in manifests.manifest_files(paths):
        try:
            with open(f, encoding="utf-8") as fh:
                docs = load_documents(fh.read(), f)
        except OSError as e:
            raise BaseModelError(f"{f}: cannot read: {e.strerror}") from None
        except YamlError as e:
            raise BaseModelError(str(e)) from None
        found.extend((d, where(d, f)) for d in docs if isinstance(d, dict) and base_models.is_bbr_configmap(d))
    return base_models.from_configmaps(found)


class MappingWatcher:
    def __init__(self, paths: Sequence[str], interval: float = 1.0) -> None:
        self.paths, self.interval = list(paths), interval
        self._stamp: tuple[tuple[str, int, int], ...] = ()

    def load(self) -> BaseModels:
        self._stamp = manifests.stamp(manifests.manifest_files(self.paths))
        return read(self.paths)

    async def run(self, router: BodyBasedRouter) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                files = await asyncio.to_thread(manifests.manifest_files, self.paths)
                current = manifests.stamp(files)
                if current == self._stamp:
                    continue
                self._stamp = current
                router.base_models = await asyncio.to_thread(read, self.paths)
                log.info("base-model mapping reloaded: %d adapters", len(router.base_models.adapters))
            except (BaseModelError, manifests.ManifestError) as e:
                log.error("base-model mapping not reloaded, the last good one stays: %s", e)
