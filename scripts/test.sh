#!/usr/bin/env bash
# Install everything the test suite needs, then run it. Safe to re-run: each
# step is skipped when its tool is already there.
#   - Debian: mosquitto-clients (mosquitto_pub/sub), mosquitto (behaviour comparisons),
#     nodejs/npm when absent
#   - npm: MQTT.js for the WebSocket tests (tests/js)
#   - pip: this package (compiled in place) with its [test] extras
# Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=()
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# `npm ls` fails when a dependency is missing or not the version package.json
# pins, so a stale node_modules is refreshed too.
if [ -f tests/js/package.json ] && ! (cd tests/js && npm ls --silent >/dev/null 2>&1); then
    echo "installing MQTT.js for the WebSocket tests"
    (cd tests/js && npm install --no-audit --no-fund --silent)
fi

python -m pip install -q --disable-pip-version-check -e '.[test]'
exec python -m pytest "$@"
