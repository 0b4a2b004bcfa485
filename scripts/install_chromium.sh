#!/usr/bin/env bash
# Debian's chromium and chromedriver, which tests/test_browser.py drives: installed when missing,
# where this machine allows it (apt-get, as root or through sudo without a password). Where it
# cannot, it says why and leaves it: the browser tests then skip with that reason (in CI, `CI` set,
# they fail). --required (.ci/run): exit 1 instead.
set -uo pipefail
required=0; [ "${1:-}" = "--required" ] && required=1
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
give_up() {
    echo "chromium: not installed ($1); tests/test_browser.py will skip. To run it: apt-get install chromium chromium-driver"
    exit "$required"
}
command -v apt-get >/dev/null || give_up "no apt-get on this machine"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || give_up "not root, and no sudo without a password"
    sudo=(sudo -n)
fi
echo "installing chromium and chromium-driver for tests/test_browser.py (apt-get)"
"${sudo[@]}" apt-get update -q && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q \
    --no-install-recommends chromium chromium-driver || give_up "apt-get failed"
