#!/usr/bin/env bash
# Debian's chromium for the browser UI's end-to-end test (tests/serving/test_browser.py), which
# drives it with Playwright; Playwright's own browser download needs hosts this network cannot
# reach. Does nothing when chromium is already installed; needs root (or sudo) otherwise.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  echo "[browser] $(chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[browser] need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
echo "[browser] installing Debian chromium"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
