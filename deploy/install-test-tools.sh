#!/usr/bin/env bash
# Installs the tools that tests/deploy needs, quietly, and does nothing when they are present:
#   promtool        Debian package prometheus (its daemon is kept from starting)
#   docker-compose  Debian package docker-compose (Compose v1, for `docker-compose config`)
#   hadolint, kubernetes-validate, check-jsonschema, KEDA models
#                   pinned in tests/deploy/requirements.txt, into $PYTHON's environment
# Usage: PYTHON=.venv/bin/python deploy/install-test-tools.sh   (PYTHON defaults to python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

apt_packages=()
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || apt_packages+=(docker-compose)

if ((${#apt_packages[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Only promtool is wanted: a policy-rc.d that says "no" keeps the package's daemon stopped.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

# The Python-distributed tools: install the pinned set if any of them is missing.
if ! "$python" - <<'PY' >/dev/null 2>&1
import importlib, pathlib, shutil, sysconfig
for module in ("kubernetes_validate", "check_jsonschema", "cloudcoil.models.keda.v1alpha1", "jsonschema"):
    importlib.import_module(module)
scripts = pathlib.Path(sysconfig.get_path("scripts"))
assert (scripts / "hadolint").is_file() or shutil.which("hadolint")
assert (scripts / "check-jsonschema").is_file() or shutil.which("check-jsonschema")
PY
then
  "$python" -m pip install -q --disable-pip-version-check -r "$root/tests/deploy/requirements.txt"
fi
