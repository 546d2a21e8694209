#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py, from Debian's packages: Playwright (pip, the `test` extra) drives
# /usr/bin/chromium through executable_path; Playwright's own browser download is not used. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver
chromium --version
