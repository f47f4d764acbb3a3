#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager (v1.20.2) from Debian bookworm's `kubernetes`
# source package into a cache outside the repository. Idempotent: exits at once when the binaries
# are present. Why from source: no Docker engine and no prebuilt server binaries on these machines,
# but the Debian source package carries a full vendor/ tree that builds offline.
set -Eeuo pipefail # -E: the ERR trap below also fires inside functions

K8S_VERSION="v1.20.2"
CACHE="${SPECOPS_CACHE:-$HOME/.cache/specops}"
OUT="$CACHE/k8s-$K8S_VERSION"
BIN="$OUT/bin"
MIRROR="${SPECOPS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${SPECOPS_DEBIAN_SUITE:-bookworm}"
# rsync: the kubernetes build copies its binaries with it; openssl, curl: up.sh.
PACKAGES=(golang-go etcd-server golang-github-modern-go-reflect2-dev dpkg-dev make rsync ca-certificates
  openssl curl)

log() { printf '[control-plane/build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Bumped whenever the recipe below changes what gets built, so stale caches are rebuilt.
RECIPE=3
if [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" && "$(cat "$BIN/recipe" 2>/dev/null)" == "$RECIPE" ]]; then
  log "cached: $BIN"
  exit 0
fi

# Any failing step names itself instead of leaving only the tool's last words.
trap 'log "ERROR: build failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo -n "$@" || die "sudo -n failed: run as root, or allow $(id -un) passwordless sudo for apt-get"
  else
    die "not root and no sudo: install as root: apt-get install ${PACKAGES[*]}"
  fi
}

# Never prompt (debconf) and never wait forever on another apt/dpkg holding its lock.
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get install "${APT_OPTS[@]}" "${missing[@]}" \
      || { as_root apt-get -q -o DPkg::Lock::Timeout=300 update \
        && as_root apt-get install "${APT_OPTS[@]}" "${missing[@]}"; } \
      || die "could not install ${missing[*]} with apt-get"
  fi
}

# Fetch and unpack the source with a private source list and lists dir: the system's apt config is
# left untouched.
fetch_source() {
  local apt_dir="$OUT/apt" src_dir="$OUT/src"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/parts" "$src_dir"
  echo "deb-src $MIRROR $SUITE main" >"$apt_dir/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Sandbox::User=root")
  log "fetching the kubernetes source package from $MIRROR $SUITE"
  apt-get "${opts[@]}" update
  compgen -G "$apt_dir/lists/*_Sources*" >/dev/null || die "no source index from $MIRROR $SUITE (network? mirror?)"
  rm -rf "$src_dir/tree"
  (cd "$src_dir" && apt-get "${opts[@]}" source --download-only kubernetes)
  (cd "$src_dir" && dpkg-source --no-check -x ./kubernetes_*.dsc tree)
}

# Two fixes for building 2021 sources with bookworm's Go 1.19:
# - Debian's reflect2 1.0.2 replaces the vendored copy, which segfaults on custom-resource writes.
# - The OpenAPI type validator (kube-openapi's, which validates custom resources and CRD defaults,
#   and go-openapi's twin) took a value equal to its type's zero value for null by comparing
#   reflect.Value structs. Since Go 1.19 a decoded "" or 0 shares the zero value's storage, so
#   every empty string and zero number in a custom resource was rejected ("must be of type
#   string: null"). Only a real nil is null: the check kube-openapi itself carries today.
ZERO_CHECK='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
patch_vendor() {
  local tree="$1" reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r "$reflect2" "$tree/vendor/github.com/modern-go/reflect2"
  local typego
  for typego in "$tree/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go" \
    "$tree/vendor/github.com/go-openapi/validate/type.go"; do
    grep -qF "$ZERO_CHECK" "$typego" || { log "zero-value check not found in $typego"; exit 1; }
    sed -i "s/^\(\s*\)if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/\1if data == nil {/" "$typego"
    if grep -qF "$ZERO_CHECK" "$typego"; then log "patching $typego failed"; exit 1; fi
  done
}

build() {
  local tree="$1"
  log "building kube-apiserver and kube-controller-manager (about 10 min cold on 2 cores)"
  # GOPATH mode as debian/rules sets it up: the tree is k8s.io/kubernetes inside a private GOPATH.
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
  (
    cd "$tree/.go/src/k8s.io/kubernetes"
    export GOPATH="$tree/.go" GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" \
      KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
  )
  local built="$tree/_output/local/bin/linux/amd64"
  [[ -x "$built/kube-apiserver" ]] || built="$tree/_output/bin"
  mkdir -p "$BIN.tmp"
  cp "$built/kube-apiserver" "$built/kube-controller-manager" "$BIN.tmp/"
  echo "$RECIPE" >"$BIN.tmp/recipe"
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
}

# One build at a time per cache (parallel test sessions, CI and a developer): the others wait
# here (bounded) and then find the binaries cached.
LOCK_TIMEOUT="${SPECOPS_BUILD_LOCK_TIMEOUT:-1800}"
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  log "another build holds $OUT/.lock: waiting up to ${LOCK_TIMEOUT}s for it"
  flock -w "$LOCK_TIMEOUT" 9 || die "$OUT/.lock still held after ${LOCK_TIMEOUT}s"
fi
if [[ -x "$BIN/kube-apiserver" && "$(cat "$BIN/recipe" 2>/dev/null)" == "$RECIPE" ]]; then
  log "cached: $BIN (built meanwhile)"
  exit 0
fi

start=$(date +%s)
install_packages
# A tree left by an interrupted build is reused (its Go build cache lives inside it).
if [[ "$(cat "$OUT/src/tree/.specops-prepared" 2>/dev/null)" != "$RECIPE" ]]; then
  fetch_source
  patch_vendor "$OUT/src/tree"
  echo "$RECIPE" >"$OUT/src/tree/.specops-prepared"
fi
build "$OUT/src/tree"
rm -rf "$OUT/src"
log "done in $(($(date +%s) - start)) s: $BIN"
