#!/usr/bin/env bash
# Install the headless browser the browser tests drive (tests/test_browser.py, marker `browser`):
# Debian's chromium and its matching chromedriver. Needs root (CI runs as root) or sudo.
# Does nothing when both are already present.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
    echo "browser-deps: $CHROMIUM and $CHROMEDRIVER are present; nothing to do"
    "$CHROMIUM" --version 2>/dev/null || true
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser-deps: apt-get not found; install chromium and chromedriver with your package manager" >&2
    echo "browser-deps: so that $CHROMIUM and $CHROMEDRIVER exist" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "browser-deps: not root and no sudo; run this script as root" >&2
        exit 1
    fi
fi

missing=()
[[ -x "$CHROMIUM" ]] || missing+=("$CHROMIUM")
[[ -x "$CHROMEDRIVER" ]] || missing+=("$CHROMEDRIVER")
echo "browser-deps: missing ${missing[*]}; installing Debian packages chromium and chromium-driver"
echo "browser-deps: + ${SUDO[*]:+${SUDO[*]} }apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
echo "browser-deps: + ${SUDO[*]:+${SUDO[*]} }apt-get install -y --no-install-recommends chromium chromium-driver"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver

for path in "$CHROMIUM" "$CHROMEDRIVER"; do
    if [[ ! -x "$path" ]]; then
        echo "browser-deps: $path is still missing after the install" >&2
        exit 1
    fi
done
echo "browser-deps: installed: $("$CHROMIUM" --version 2>/dev/null || echo chromium); $("$CHROMEDRIVER" --version 2>/dev/null | head -1)"
