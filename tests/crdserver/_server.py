"""A modern CRD server for tests: etcd 3.5 + apiextensions-apiserver 0.36 (hack/crd-server/build.sh).

apiextensions-apiserver is the part of kube-apiserver that serves CustomResourceDefinitions and
custom resources: structural-schema checks, defaulting, pruning, CEL (`x-kubernetes-validations`,
with its cost budget and transition rules), strict field validation, server-side apply, and the
status and scale subresources, all as a Kubernetes 1.36 server does them. It serves nothing else:
no core API (`/api`), so no namespaces, RBAC or controllers; custom resources may be created in any
namespace. kubectl needs `/api` for discovery and refuses such a server, so tests speak HTTP.

Authentication: a client certificate signed by a CA made here (CN specops-admin, O system:masters,
a group the delegated authorizer always allows). The server's "core" kubeconfig, which it needs for
informers and for delegated authn/authz lookups, points back at itself; what it would look up there
(Services, SubjectAccessReviews) does not exist, so requests without the certificate fail and the
server logs reflector errors about Services: both expected. Admission plugins that watch core or
admissionregistration objects are disabled.

Every process is recorded in STATE/pids and hack/control-plane/watchdog.sh stops them
(hack/control-plane/down.sh) once the test process is gone, even after a kill -9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import requests
import yaml

from specops.testing.net import free_port
from specops.testing.poll import until

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack"
Obj = dict[str, Any]
T = TypeVar("T")
CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
# Plugins that wait for informers of APIs this server does not serve (namespaces, webhooks, policies).
DISABLED_ADMISSION = (
    "NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
    "ValidatingAdmissionPolicy,MutatingAdmissionPolicy"
)


class BuildError(RuntimeError):
    """hack/crd-server/build.sh failed or ran past its time."""


def build_binaries(timeout: float = float(os.environ.get("SPECOPS_BUILD_TIMEOUT", "3600"))) -> Path:
    """The bin directory with apiextensions-apiserver and etcd; ~10 min on 2 cores when not cached.

    The script's log goes straight to the terminal (a cold build must not look like a hang); on
    timeout its whole process group (apt, go) is killed.
    """
    script = HACK / "crd-server" / "build.sh"
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    process = subprocess.Popen(
        [script], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, start_new_session=True, env=env
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise BuildError(f"{script} did not finish in {timeout:.0f}s (SPECOPS_BUILD_TIMEOUT)") from None
    if process.returncode != 0:
        raise BuildError(f"{script} failed (exit {process.returncode}); its ERROR line above names the step")
    return Path(out.strip().splitlines()[-1])


class ApiError(Exception):
    """A request the server refused: HTTP code, its Status message and every cause's message."""

    def __init__(self, code: int, status: Obj) -> None:
        self.code = code
        self.status = status
        causes = [c.get("message", "") for c in (status.get("details") or {}).get("causes") or []]
        self.messages = [status.get("message", ""), *causes]
        super().__init__(f"{code}: {status.get('message', status)}")

    def mentions(self, fragment: str) -> bool:
        return any(fragment in m for m in self.messages)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class CrdServer:
    """One running etcd + apiextensions-apiserver on loopback; `client()` speaks to it."""

    state: Path
    server: str
    bin_dir: Path

    @classmethod
    def start(cls, state: Path, bin_dir: Path, owner: int, timeout: float = 60.0) -> CrdServer:
        state.mkdir(parents=True, exist_ok=True)
        pki = state / "pki"
        pki.mkdir(exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=specops-test-ca",
                 "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"))  # fmt: skip
        (pki / "serving.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name, subject, ext in (
            ("admin", "/O=system:masters/CN=specops-admin", []),
            ("serving", "/CN=apiextensions-apiserver", ["-extfile", str(pki / "serving.ext")]),
        ):
            _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                     "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"))  # fmt: skip
            _openssl("x509", "-req", "-days", "2", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
                     "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-out", str(pki / f"{name}.crt"), *ext)  # fmt: skip
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        kubeconfig = state / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: crd\n"
            f"clusters: [{{name: crd, cluster: {{server: '{server}', certificate-authority: '{pki / 'ca.crt'}'}}}}]\n"
            f"users: [{{name: admin, user: {{client-certificate: '{pki / 'admin.crt'}', "
            f"client-key: '{pki / 'admin.key'}'}}}}]\n"
            "contexts: [{name: crd, context: {cluster: crd, user: admin}}]\n"
        )
        pids = state / "pids"
        pids.write_text("")
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        etcd = [
            str(bin_dir / "etcd"), "--data-dir", str(state / "etcd"), "--name", "crd",
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"crd={peer_url}", "--quota-backend-bytes", str(512 << 20),
        ]  # fmt: skip
        api = [
            str(bin_dir / "apiextensions-apiserver"), "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--secure-port", str(api_port),
            "--tls-cert-file", str(pki / "serving.crt"), "--tls-private-key-file", str(pki / "serving.key"),
            "--client-ca-file", str(pki / "ca.crt"), "--authentication-skip-lookup",
            "--kubeconfig", str(kubeconfig), "--authentication-kubeconfig", str(kubeconfig),
            "--authorization-kubeconfig", str(kubeconfig),
            "--disable-admission-plugins", DISABLED_ADMISSION, "--enable-priority-and-fairness=false",
        ]  # fmt: skip
        self = cls(state, server, bin_dir)
        try:
            for name, argv in (("etcd", etcd), ("apiserver", api)):
                with (state / f"{name}.log").open("wb") as log:
                    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
                with pids.open("a") as f:
                    f.write(f"{proc.pid}\n")
                if name == "etcd":
                    until(lambda: _get_ok(f"{etcd_url}/health"), timeout, "etcd /health")
            # The watchdog stops both once `owner` is gone (a test run killed with -9 leaves nothing).
            subprocess.Popen(
                [str(HACK / "control-plane" / "watchdog.sh"), str(owner), str(state)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            client = self.client()
            until(lambda: client.ready(), timeout, f"apiextensions-apiserver at {server}")
        except BaseException:
            self.stop()
            for name in ("etcd", "apiserver"):
                tail = (state / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                print(f"--- {name}.log (tail)", *tail, sep="\n", file=sys.stderr)
            raise
        return self

    def stop(self) -> None:
        subprocess.run([HACK / "control-plane" / "down.sh", str(self.state)], check=False)

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def client(self) -> Client:
        pki = self.state / "pki"
        return Client(self.server, (str(pki / "admin.crt"), str(pki / "admin.key")), str(pki / "ca.crt"))


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


class Client:
    """The few calls the tests make: server-side apply, create, update, get, patch, subresources."""

    def __init__(self, server: str, cert: tuple[str, str], ca: str) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.cert = cert
        self.ca = ca  # per request: a session's `verify` loses to REQUESTS_CA_BUNDLE from the environment
        self.warnings: list[str] = []  # the last response's Warning headers (deprecations, ignored fields)

    def ready(self) -> bool:
        try:
            # informer-sync never passes: it waits on informers of Services this server does not serve.
            return self.session.get(
                f"{self.server}/readyz?exclude=informer-sync", timeout=2, verify=self.ca
            ).ok
        except requests.RequestException:
            return False

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                params: dict[str, str] | None = None) -> Obj:  # fmt: skip
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        response = self.session.request(
            method,
            f"{self.server}{path}",
            json=body,
            headers=headers,
            params=params,
            timeout=30,
            verify=self.ca,
        )
        self.warnings = [w for w in [response.headers.get("Warning")] if w]
        payload = response.json() if response.content else {}
        if not response.ok:
            raise ApiError(response.status_code, payload)
        return payload

    @staticmethod
    def path(obj: Obj, namespace: str | None = None, plural: str | None = None) -> str:
        """The collection path of a custom resource's kind (plural from its CRD's naming rule)."""
        group_version = obj["apiVersion"]
        kind = obj["kind"]
        plural = plural or kind.lower() + "s"
        ns = namespace or obj.get("metadata", {}).get("namespace")
        ns_part = f"/namespaces/{quote(ns)}" if ns else ""
        return f"/apis/{group_version}{ns_part}/{plural}"

    def apply(self, obj: Obj, path: str, manager: str = "specops-tests", force: bool = True) -> Obj:
        """Server-side apply with strict field validation (as `kubectl apply --server-side`)."""
        params = {"fieldManager": manager, "fieldValidation": "Strict", "force": str(force).lower()}
        name = obj["metadata"]["name"]
        return self.request("PATCH", f"{path}/{name}", obj, "application/apply-patch+yaml", params)

    def create(self, obj: Obj, path: str) -> Obj:
        return self.request("POST", path, obj, params={"fieldValidation": "Strict"})

    def update(self, obj: Obj, path: str) -> Obj:
        name = obj["metadata"]["name"]
        return self.request("PUT", f"{path}/{name}", obj, params={"fieldValidation": "Strict"})

    def get(self, path: str, name: str, subresource: str = "") -> Obj:
        return self.request("GET", f"{path}/{name}" + (f"/{subresource}" if subresource else ""))

    def merge_patch(self, path: str, name: str, patch: Obj, subresource: str = "") -> Obj:
        url = f"{path}/{name}" + (f"/{subresource}" if subresource else "")
        return self.request(
            "PATCH", url, patch, "application/merge-patch+json", {"fieldValidation": "Strict"}
        )

    def delete(self, path: str, name: str) -> Obj:
        return self.request("DELETE", f"{path}/{name}")

    def crd(self, name: str) -> Obj:
        return self.get(CRD_API, name)


def condition(obj: Obj, type_: str) -> Obj:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def crd_manifests() -> list[Obj]:
    """The committed CRDs (crds/), as the chart and `kubectl apply -f crds/` install them."""
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]
