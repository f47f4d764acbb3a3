#!/usr/bin/env bash
# Start etcd + kube-apiserver + kube-controller-manager on loopback, free ports chosen now.
#   up.sh [--rbac] [--owner PID] STATE_DIR
# Writes into STATE_DIR: kubeconfig (admin), tokens.csv, pids (one PID a line, for down.sh),
# env (SERVER=, ADMIN_TOKEN=, KUBECONFIG=, RBAC=), the three logs, and audit.log: every request
# made with a ServiceAccount token (what the RBAC test reads to see which permissions are used). Without --rbac every
# authenticated request is allowed; with it the apiserver authorizes by RBAC (admin is in
# system:masters). Waits until the apiserver is ready and the controller-manager works (the
# `default` ServiceAccount exists); on failure stops what it started and prints the logs' tails.
# With --owner, watchdog.sh runs down.sh once process PID is gone (a test run killed with -9
# leaves nothing behind).
set -euo pipefail

RBAC=false
OWNER=""
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --rbac) RBAC=true; shift ;;
    --owner) OWNER="$2"; shift 2 ;;
    *) echo "up.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
STATE="${1:?usage: up.sh [--rbac] [--owner PID] STATE_DIR}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
K8S_VERSION="v1.20.2"
BIN="${SPECOPS_K8S_BIN:-${SPECOPS_CACHE:-$HOME/.cache/specops}/k8s-$K8S_VERSION/bin}"
ETCD="${SPECOPS_ETCD:-$(command -v etcd || echo /usr/bin/etcd)}"
TIMEOUT="${SPECOPS_UP_TIMEOUT:-90}"

for exe in "$BIN/kube-apiserver" "$BIN/kube-controller-manager" "$ETCD"; do
  [[ -x "$exe" ]] || { echo "up.sh: $exe missing: run hack/control-plane/build.sh" >&2; exit 2; }
done

mkdir -p "$STATE/pki"
STATE="$(cd "$STATE" && pwd)"
: >"$STATE/pids"

# Free loopback ports: bind to port 0 and read back what the kernel picked.
read -r ETCD_PORT PEER_PORT API_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
SERVER="https://127.0.0.1:$API_PORT"

ADMIN_TOKEN="$(openssl rand -hex 16)"
CM_TOKEN="$(openssl rand -hex 16)"
# token,user,uid,"groups"
cat >"$STATE/tokens.csv" <<CSV
$ADMIN_TOKEN,specops-admin,1,"system:masters"
$CM_TOKEN,system:kube-controller-manager,2,"system:masters"
CSV
# Service-account tokens: the controller-manager signs them, the apiserver checks them.
openssl genrsa -out "$STATE/pki/sa.key" 2048 2>/dev/null

cat >"$STATE/audit-policy.yaml" <<YAML
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
YAML

kubeconfig() { # FILE TOKEN USER
  cat >"$1" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: specops-e2e
  cluster:
    server: $SERVER
    insecure-skip-tls-verify: true
users:
- name: $3
  user:
    token: $2
contexts:
- name: specops-e2e
  context: {cluster: specops-e2e, user: $3, namespace: default}
current-context: specops-e2e
YAML
}
kubeconfig "$STATE/kubeconfig" "$ADMIN_TOKEN" specops-admin
kubeconfig "$STATE/controller-manager.kubeconfig" "$CM_TOKEN" system:kube-controller-manager

start() { # NAME CMD...
  local name="$1"; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo "$!" >>"$STATE/pids"
}

fail() {
  echo "up.sh: $*" >&2
  for log in etcd apiserver controller-manager; do
    [[ -f "$STATE/$log.log" ]] && { echo "--- $log.log" >&2; tail -n 15 "$STATE/$log.log" >&2; }
  done
  "$HERE/down.sh" "$STATE" || true
  exit 1
}

start etcd "$ETCD" --name specops-e2e --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "specops-e2e=http://127.0.0.1:$PEER_PORT" --log-level error

AUTHZ=AlwaysAllow
$RBAC && AUTHZ=RBAC
# --insecure-port=0 is required in 1.20; the serving cert is self-signed into pki/. Beta API
# versions are off: everything we and the chart create is GA (v1), and not installing them cuts
# the apiserver's start from ~10 s to ~6 s on 2 busy cores.
start apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
  --cert-dir "$STATE/pki" --token-auth-file "$STATE/tokens.csv" --authorization-mode "$AUTHZ" \
  --service-account-issuer https://specops-e2e.local --service-account-key-file "$STATE/pki/sa.key" \
  --service-account-signing-key-file "$STATE/pki/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
  --audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/audit.log" \
  --enable-priority-and-fairness=false --runtime-config api/beta=false \
  --allow-privileged=true --event-ttl 10m --v 1 \
  --enable-admission-plugins OwnerReferencesPermissionEnforcement

curl_api() { curl -ksf --max-time 2 -H "Authorization: Bearer $ADMIN_TOKEN" "$SERVER$1"; }
deadline=$((SECONDS + TIMEOUT))
until [[ "$(curl_api /readyz 2>/dev/null)" == ok ]]; do
  ((SECONDS < deadline)) || fail "apiserver not ready after ${TIMEOUT}s"
  alive "$(sed -n 2p "$STATE/pids")" || fail "apiserver exited"
  sleep 0.3
done

# No secure serving for the controller-manager: nothing scrapes it, and readiness is judged by
# its work (the ServiceAccount controller creating `default`).
start controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --port 0 --secure-port 0 --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/apiserver.crt" \
  --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-csrsigning,-csrapproving,-csrcleaner,-bootstrapsigner,-tokencleaner,-attachdetach,-persistentvolume-expander,-ttl,-podgc' \
  --concurrent-gc-syncs 5 --v 1

until curl_api /api/v1/namespaces/default/serviceaccounts/default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || fail "controller-manager did not create the default ServiceAccount in ${TIMEOUT}s"
  alive "$(sed -n 3p "$STATE/pids")" || fail "controller-manager exited"
  sleep 0.3
done

if [[ -n "$OWNER" ]]; then
  setsid "$HERE/watchdog.sh" "$OWNER" "$STATE" >>"$STATE/watchdog.log" 2>&1 </dev/null &
fi

cat >"$STATE/env" <<ENV
SERVER=$SERVER
ADMIN_TOKEN=$ADMIN_TOKEN
KUBECONFIG=$STATE/kubeconfig
RBAC=$RBAC
ENV
echo "control plane up: $SERVER (state $STATE, rbac=$RBAC)"
