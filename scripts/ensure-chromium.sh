#!/usr/bin/env bash
# Headless Chromium for the report's browser test: a `chromium` already on
# PATH, else the Debian package (needs root or sudo; apt's mirror is one of
# the registries this project may use). Prints the binary's path.
set -euo pipefail
for c in chromium chromium-browser google-chrome; do
  if command -v "$c" >/dev/null 2>&1; then command -v "$c"; exit 0; fi
done
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "chromium is not installed and there is no root or sudo to apt-get it" >&2; exit 1; }
  sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
# A lock held by another apt run: wait for it rather than fail.
$sudo apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
$sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >&2
command -v chromium
