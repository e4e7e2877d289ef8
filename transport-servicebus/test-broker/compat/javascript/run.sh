#!/usr/bin/env bash
# Runs the JavaScript compatibility suite: Microsoft's @azure/service-bus SDK, unpatched,
# against the servicebus-test-broker program.
#
# Installs the pinned SDK from npm into $COMPAT_JS (default: <cargo target dir>/compat-js),
# builds and starts the broker on a free loopback address (127.0.0.2:5672 and up), runs
# suite.js and stops the broker. Extra arguments are test names to run alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
modules="${COMPAT_JS:-$target/compat-js}"
sdk="@azure/service-bus@7.9.5"

if [ ! -f "$modules/node_modules/@azure/service-bus/package.json" ] ||
    ! grep -q '"version": "7.9.5"' "$modules/node_modules/@azure/service-bus/package.json"; then
    mkdir -p "$modules"
    npm install --silent --no-audit --no-fund --prefix "$modules" "$sdk"
fi

export NODE_PATH="$modules/node_modules"
mapfile -t entities < <(node "$here/suite.js" --entities)
# shellcheck source=../broker.sh
source "$here/../broker.sh"
start_broker "${entities[@]}"

node "$here/suite.js" "$connection_string" "$@"
