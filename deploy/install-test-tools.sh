#!/usr/bin/env bash
# Installs the tools that tests/deploy needs, quietly, and does nothing when they are present:
#   promtool        Debian package prometheus (its daemon is kept from starting)
#   docker-compose  Debian package docker-compose (Compose v1, for `docker-compose config`)
# The Python-distributed tools (hadolint, kubernetes-validate, ...) are pinned in pyproject's `test` extra.
set -euo pipefail

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
