#!/usr/bin/env bash
# Idempotent install of what the viewer's browser tests need (tests/test_viewer_browser.py):
# Debian's chromium (apt) and Playwright's Python package in the mmshim venv. Playwright drives
# /usr/bin/chromium; `playwright install` (a browser download) is never run.
set -euo pipefail

PREFIX=${MMSHIM_PREFIX:-/opt/mmshim}
VENV=$PREFIX/venv
PLAYWRIGHT_SPEC=${MMSHIM_PLAYWRIGHT_SPEC:-playwright>=1.45}

log() { printf '[setup-browser] %s\n' "$*" >&2; }
die() { printf '[setup-browser] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages)"
[ -x "$VENV/bin/python" ] || die "no venv at $VENV: run install/setup-host.sh first"

if dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed' && [ -x /usr/bin/chromium ]; then
  log "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
else
  log "installing chromium (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if "$VENV/bin/python" -c 'import playwright.sync_api' 2>/dev/null; then
  log "playwright: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
else
  log "installing $PLAYWRIGHT_SPEC into $VENV (no browser download)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/pip" install -q "$PLAYWRIGHT_SPEC"
fi
log "ok"
