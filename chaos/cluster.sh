#!/usr/bin/env bash
# A local 3-node RabbitMQ cluster for the cluster test and the chaos suite.
#
#   chaos/cluster.sh start | stop | status | stop-node N | start-node N | queues PREFIX | urls
#
# Nodes rdlv-c1@localhost .. rdlv-c3@localhost, AMQP on 5801-5803, Erlang distribution on
# 25801-25803, no plugins; data, logs, config and the Erlang cookie in $RDLV_CLUSTER_DIR
# (default /tmp/rdlv-c-cluster). Every rabbitmqctl call names its node with `-n`: the system
# node (rabbit@<host> on 5672) is never touched.
set -euo pipefail

DIR=${RDLV_CLUSTER_DIR:-/tmp/rdlv-c-cluster}
BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

node() { echo "rdlv-c$1@localhost"; }
amqp_port() { echo $((5800 + $1)); }

env_of() {
    local n=$1 base="$DIR/n$1"
    echo HOME="$DIR" \
        RABBITMQ_NODENAME="$(node "$n")" \
        RABBITMQ_USE_LONGNAME=false \
        RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
        RABBITMQ_DIST_PORT=$((25800 + n)) \
        RABBITMQ_MNESIA_BASE="$base/mnesia" \
        RABBITMQ_LOG_BASE="$base/log" \
        RABBITMQ_PID_FILE="$base/pid" \
        RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$base/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
        RABBITMQ_CONF_ENV_FILE="$base/rabbitmq-env.conf"
}

ctl() {
    local n=$1
    shift
    # Without the directory (no cluster) the CLI could not create its cookie and would leave
    # an erl_crash.dump in the caller's directory: there is no node to ask.
    [ -d "$DIR" ] || return 1
    env HOME="$DIR" "$BIN/rabbitmqctl" -n "$(node "$n")" "$@"
}

prepare() {
    local n=$1 base="$DIR/n$1"
    mkdir -p "$base/mnesia" "$base/log"
    cat >"$base/rabbitmq.conf" <<CONF
listeners.tcp.default = $(amqp_port "$n")
loopback_users = none
log.file.level = info
log.console = false
CONF
    # A quorum queue dead-letters at least once (the delay cascade's levels do) by publishing
    # to the target and waiting for its confirm; an unconfirmed hop (the target's leader was on
    # the node that stopped) is tried again only after this time-out, 180 s by default, during
    # which the message sits in the source queue's dead-letter outbox. 5 s here, as we advise
    # for production (chaos/RESULTS.md).
    echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].' >"$base/advanced.config"
    echo '[].' >"$base/enabled_plugins"
    : >"$base/rabbitmq-env.conf"
}

start_node() {
    local n=$1
    if ctl "$n" status >/dev/null 2>&1; then
        echo "$(node "$n") is already running"
        return
    fi
    prepare "$n"
    # From the node's own directory: an Erlang crash dump lands there, not in the caller's.
    # shellcheck disable=SC2046
    (cd "$DIR/n$n" && env $(env_of "$n") "$BIN/rabbitmq-server" -detached)
    ctl "$n" wait --timeout 60 "$DIR/n$n/pid" >/dev/null
    ctl "$n" await_startup --timeout 60 >/dev/null
    echo "$(node "$n") up on amqp://127.0.0.1:$(amqp_port "$n")"
}

stop_node() {
    local n=$1
    if ctl "$n" status >/dev/null 2>&1; then
        ctl "$n" stop "$DIR/n$n/pid" >/dev/null
        echo "$(node "$n") stopped"
    else
        echo "$(node "$n") was not running"
    fi
}

start() {
    mkdir -p "$DIR"
    if [ ! -f "$DIR/.erlang.cookie" ]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie"
        chmod 400 "$DIR/.erlang.cookie"
    fi
    local fresh=false
    [ -d "$DIR/n1/mnesia" ] || fresh=true
    for n in "${NODES[@]}"; do start_node "$n"; done
    if $fresh; then
        for n in 2 3; do
            ctl "$n" stop_app >/dev/null
            ctl "$n" reset >/dev/null
            ctl "$n" join_cluster "$(node 1)" >/dev/null
            ctl "$n" start_app >/dev/null
        done
    fi
    # Quorum queues across the three nodes need every feature flag the nodes support.
    ctl 1 enable_feature_flag all >/dev/null
    ctl 1 cluster_status --formatter json | grep -o '"running_nodes":\[[^]]*\]'
}

stop() {
    for n in "${NODES[@]}"; do stop_node "$n"; done
    rm -rf "$DIR"
}

status() {
    for n in "${NODES[@]}"; do
        if ctl "$n" status >/dev/null 2>&1; then
            echo "$(node "$n") running, amqp://127.0.0.1:$(amqp_port "$n")"
        else
            echo "$(node "$n") down"
        fi
    done
}

check_n() {
    case "${1:-}" in 1 | 2 | 3) ;; *) echo "node number 1, 2 or 3 expected" >&2; exit 2 ;; esac
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
stop-node) check_n "${2:-}"; stop_node "$2" ;;
start-node) check_n "${2:-}"; start_node "$2" ;;
queues)
    # Every queue whose name starts with $2: name, messages (all, the dead-letter outbox of a
    # quorum queue included), ready, unacknowledged. Asked of node 2, which the suites never stop.
    ctl 2 list_queues name messages messages_ready messages_unacknowledged --no-table-headers -q |
        awk -v p="${2:?prefix}" 'index($1, p) == 1' ;;
urls) echo "amqp://guest:guest@127.0.0.1:5801,127.0.0.1:5802,127.0.0.1:5803/%2f" ;;
*) echo "usage: $0 start|stop|status|stop-node N|start-node N|urls" >&2; exit 2 ;;
esac
