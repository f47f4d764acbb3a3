"""A small generic REST layer over the official Kubernetes client, returning plain dicts.

Why not the typed APIs: children are built as dicts, and typed deserialization drops fields the
client version does not know. Why not server-side apply: a v1.20 API server rejects SSA of a Job
with an integer GPU limit, so creation is POST and every change is a JSON merge patch — which
both a real API server and kmock support. The client (urllib3) is synchronous; kopf runs our
sync handlers in its thread pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from specops_operator.builders.common import label_selector

PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "Job": "jobs",
    "StatefulSet": "statefulsets",
    "SpeculatorDataGen": "speculatordatagens",
    "SpeculatorTraining": "speculatortrainings",
    "Event": "events",
    "Workload": "workloads",
    "Secret": "secrets",
    "NetworkPolicy": "networkpolicies",
}


@dataclass
class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP code (404, 409, 422, 500, ...)."""

    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"


def object_path(
    api_version: str, kind: str, namespace: str, name: str, subresource: str | None = None
) -> str:
    path = f"{collection_path(api_version, kind, namespace)}/{name}"
    return f"{path}/{subresource}" if subresource else path


class Kube:
    """create / get / list / merge-patch / delete of namespaced objects as dicts."""

    def __init__(self, api_client: Any, timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster service account when running in a pod, else the current kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    @classmethod
    def for_host(cls, host: str, token: str | None = None, verify_ssl: bool = True) -> Kube:
        """A client for an explicit server URL (tests, benches, `--server`)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = host
        configuration.verify_ssl = verify_ssl
        if token:
            configuration.api_key = {"authorization": token}
            configuration.api_key_prefix = {"authorization": "Bearer"}
        return cls(client.ApiClient(configuration))

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.api_client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*params, _request_timeout=self.timeout)
        raw = response.read()
        data = json.loads(raw) if raw else {}
        if not 200 <= response.status < 300:
            reason = data.get("reason") if isinstance(data, dict) else None
            message = data.get("message") if isinstance(data, dict) else None
            raise ApiError(response.status, str(reason or response.reason), str(message or raw[:200]))
        return data if isinstance(data, dict) else {}

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        return self._call("POST", path, manifest)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", object_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """Events about one object (also filtered here: not every server honours field selectors)."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        data = self._call(
            "GET", collection_path("v1", "Event", namespace), query=[("fieldSelector", selector)]
        )
        return [
            item
            for item in data.get("items") or []
            if (item.get("involvedObject") or {}).get("kind") == kind
            and (item.get("involvedObject") or {}).get("name") == name
        ]

    def list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Objects carrying all `labels` (also filtered here: not every server honours selectors)."""
        data = self._call(
            "GET",
            collection_path(api_version, kind, namespace),
            query=[("labelSelector", label_selector(labels))],
        )
        items = data.get("items") or []
        return [
            item
            for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        body: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = object_path(api_version, kind, namespace, name, subresource)
        return self._call("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        *,
        propagation: str = "Background",
        uid: str | None = None,
    ) -> bool:
        """Delete (pods of a Job go too; `Foreground`: before the Job does); False if already gone,
        or (`uid` given) if the object of that name is another one now."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self._call("DELETE", object_path(api_version, kind, namespace, name), body)
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 409 and uid is not None):
                return False
            raise
        return True
