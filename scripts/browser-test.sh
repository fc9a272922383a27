#!/usr/bin/env bash
# The browser pages in a real browser (the live view, `view`): installs Debian's chromium and chromium-driver (and fonts with
# CJK and emoji glyphs) when they are missing, then runs the ignored browser test in
# tests/integration/browser.rs (headless Chromium over WebDriver). Needs root or sudo for apt-get
# the first time; ~1-3 min to install, ~30 s to run.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[browser-test] %s\n' "$*" >&2; }
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { log "chromium and chromium-driver are missing, and installing them needs root (apt-get): install them, then run this again"; exit 1; }
        sudo="sudo"
    fi
    log "installing chromium, chromium-driver, fonts-noto-cjk, fonts-noto-color-emoji (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq chromium chromium-driver fonts-noto-cjk fonts-noto-color-emoji >/dev/null
fi
log "$(chromium --version 2>/dev/null | head -1); $(chromedriver --version 2>/dev/null | head -1)"
exec cargo test --locked --test integration -- --ignored browser:: --test-threads 1 "$@"
