#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager (v1.20.2) from Debian bookworm's `kubernetes`
# source package into a cache outside the repository. Idempotent: exits at once when the binaries
# are present. Why from source: no Docker engine and no prebuilt server binaries on these machines,
# but the Debian source package carries a full vendor/ tree that builds offline.
set -euo pipefail

K8S_VERSION="v1.20.2"
CACHE="${SPECOPS_CACHE:-$HOME/.cache/specops}"
OUT="$CACHE/k8s-$K8S_VERSION"
BIN="$OUT/bin"
MIRROR="${SPECOPS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${SPECOPS_DEBIAN_SUITE:-bookworm}"
# rsync: the kubernetes build copies its binaries with it.
PACKAGES=(golang-go etcd-server golang-github-modern-go-reflect2-dev dpkg-dev make rsync ca-certificates)

log() { printf '[control-plane/build] %s\n' "$*" >&2; }

if [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" ]]; then
  log "cached: $BIN"
  exit 0
fi

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get install -y --no-install-recommends "${missing[@]}" \
      || { as_root apt-get update && as_root apt-get install -y --no-install-recommends "${missing[@]}"; }
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
  rm -rf "$src_dir/tree"
  (cd "$src_dir" && apt-get "${opts[@]}" source --download-only kubernetes)
  (cd "$src_dir" && dpkg-source --no-check -x ./kubernetes_*.dsc tree)
}

# Debian's reflect2 1.0.2 replaces the vendored copy, which segfaults on custom-resource writes
# with the Go toolchain in bookworm.
patch_vendor() {
  local tree="$1" reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r "$reflect2" "$tree/vendor/github.com/modern-go/reflect2"
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
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
}

start=$(date +%s)
install_packages
# A tree left by an interrupted build is reused (its Go build cache lives inside it).
if [[ ! -f "$OUT/src/tree/.specops-prepared" ]]; then
  fetch_source
  patch_vendor "$OUT/src/tree"
  touch "$OUT/src/tree/.specops-prepared"
fi
build "$OUT/src/tree"
rm -rf "$OUT/src"
log "done in $(($(date +%s) - start)) s: $BIN"
