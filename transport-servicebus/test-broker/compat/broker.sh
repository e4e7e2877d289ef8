# Sourced by the compatibility suites' run.sh: builds the servicebus-test-broker program, starts
# it with the entities given as arguments on a free loopback address, stops it when the script
# exits, and sets `connection_string` to what it printed once listening.
# Needs `repo` (the repository) and `target` (the cargo target directory) set.

start_broker() {
    cargo build --quiet --manifest-path "$repo/Cargo.toml" -p redeliver-servicebus-testbroker \
        --bin servicebus-test-broker
    local out
    out="$(mktemp)"
    "$target/debug/servicebus-test-broker" "$@" >"$out" &
    broker_pid=$!
    broker_out="$out"
    trap 'kill "$broker_pid" 2>/dev/null || true; wait "$broker_pid" 2>/dev/null || true; rm -f "$broker_out"' EXIT

    # The broker prints its connection string once it listens.
    for _ in $(seq 1 100); do
        [ -s "$out" ] && break
        if ! kill -0 "$broker_pid" 2>/dev/null; then
            echo "servicebus-test-broker exited before listening" >&2
            exit 1
        fi
        sleep 0.1
    done
    connection_string="$(head -n 1 "$out")"
    if [ -z "$connection_string" ]; then
        echo "servicebus-test-broker printed no connection string within 10 s" >&2
        exit 1
    fi
}
