#!/usr/bin/env bash
# Runs the Python compatibility suite: Microsoft's azure-servicebus SDK, unpatched, against the
# servicebus-test-broker program.
#
# Creates a virtual environment (in $COMPAT_VENV, default: <cargo target dir>/compat-python-venv),
# installs the pinned SDK from PyPI, builds and starts the broker on a free loopback address
# (127.0.0.2:5672 and up), runs suite.py and stops the broker. Extra arguments are test names to
# run alone. Exit status: the suite's (non-zero on any unexpected failure).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
venv="${COMPAT_VENV:-$target/compat-python-venv}"
sdk="azure-servicebus==7.15.0"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import azure.servicebus' 2>/dev/null; then
    "$python" -m venv "$venv"
fi
if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("azure-servicebus"))' 2>/dev/null)" != "${sdk#*==}" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$sdk"
fi

mapfile -t entities < <("$venv/bin/python" "$here/suite.py" --entities)
# shellcheck source=../broker.sh
source "$here/../broker.sh"
start_broker "${entities[@]}"

"$venv/bin/python" "$here/suite.py" "$connection_string" "$@"
