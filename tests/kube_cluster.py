"""A small cluster on the stand-in API server (tests/kubeapi.py): epp's service account with the
chart's RBAC, and builders for the InferencePool, its Pods and InferenceObjectives.

The stand-in is not kube-apiserver; it speaks the list/watch, review and Lease protocol the
real client library (lightkube) uses. See tests/kubeapi.py for what it does not model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.kubeapi import LLMD_GROUP, V1_GROUP, X_GROUP, KubeApi

NS = "prod"
POOL = "llama"
PORT = 8000
# What the chart's Role grants epp (deploy/charts/inferencepool, least privilege).
EPP_READ = ["pods", f"inferencepools.{V1_GROUP}", f"inferencepools.{X_GROUP}",
            f"inferenceobjectives.{X_GROUP}", f"inferencemodelrewrites.{X_GROUP}",
            f"inferenceobjectives.{LLMD_GROUP}", f"inferencemodelrewrites.{LLMD_GROUP}"]


class Cluster:
    def __init__(self, api: KubeApi, tmp: Path) -> None:
        self.api = api
        self.tmp = tmp
        self.epp_token, user = api.service_account(NS, "epp")
        api.grant(user, ["get", "list", "watch"], EPP_READ, namespace=NS)
        api.grant(user, ["get", "create", "update"], ["leases.coordination.k8s.io"], namespace=NS)
        api.grant(user, ["create"], ["tokenreviews.authentication.k8s.io",
                                     "subjectaccessreviews.authorization.k8s.io"])
        self.kubeconfig = api.kubeconfig(tmp / "epp.kubeconfig", self.epp_token, namespace=NS)

    def pool(self, name: str = POOL, *, app: str = "vllm", port: int = PORT) -> dict[str, Any]:
        return self.api.apply({
            "apiVersion": f"{V1_GROUP}/v1", "kind": "InferencePool", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": app}}, "targetPorts": [{"number": port}],
                     "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}},
        })

    def pod(self, name: str, ip: str, *, app: str = "vllm", ready: bool = True) -> dict[str, Any]:
        return self.api.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        })

    def objective(self, name: str, priority: int, *, pool: str = POOL, group: str = LLMD_GROUP) -> dict[str, Any]:
        """llm-d-router's group by default: with both CRDs installed, upstream (and epp) watch that one."""
        return self.api.apply({
            "apiVersion": f"{group}/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"priority": priority, "poolRef": {"name": pool, "group": V1_GROUP}},
        })

    def metrics_reader(self, allowed: bool = True) -> str:
        """A token for a Prometheus collector, with (or without) the ClusterRole's get on /metrics."""
        token, user = self.api.service_account("monitoring", "inference-gateway-sa-metrics-reader")
        if allowed:
            self.api.grant_urls(user, ["get"], ["/metrics"])
        return token
