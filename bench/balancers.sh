# Shared by bench/replicas and bench/floor (sourced): the helpers and the
# balancer, so the floor runs in the very topology the replicas bench does.
# The sourcing script sets BENCH (its name, for messages), WORK, PIDS and
# die, and for start_balancers BALANCERS, REPLICAS and DEVICE_ADDRS (the
# replicas' device addresses); start_balancers sets LB_PORT and
# BALANCER_PIDS.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Waits (at most $1 seconds) for every file named after it.
wait_files() {
    local secs=$1; shift
    for _ in $(seq $((secs * 10))); do
        local all=1
        for f in "$@"; do [ -s "$f" ] || { all=0; break; }; done
        [ "$all" = 1 ] && return 0
        sleep 0.1
    done
    echo "$BENCH: $* did not appear within $secs s" >&2
    return 1
}
# One configuration per process, the same but for the address each
# connects to the replicas from: 127.3.<process>.<replica>. All from
# 127.0.0.1, the kernel searched the ephemeral ports of one address for a
# free four-tuple on every connect to a replica: with 100 000 sessions
# over seven replicas most ports were taken, and that search
# (__inet_check_established) was 31 % of the machine's CPU during the
# reconnect storm, the balancers 0.8 to 1 core of the two.
balancer_config() {
    local b=$1
    # 9 000 sessions a process: two descriptors each, under the cap.
    printf 'global\n  maxconn 9000\n  nbthread 1\n'
    # A connection refused by a dead replica is retried on another at once
    # (redispatch on every retry). Checks get 5 s to connect (HAProxy
    # bounds a check's connect by the smaller of `timeout connect` and
    # `inter`): with 1 s, on this machine starved of CPU during the
    # 100 000-session run, every check timed out together and every
    # replica was marked down (no server available) for seconds at a time.
    printf 'defaults\n  mode tcp\n  timeout connect 5s\n  timeout check 5s\n  timeout client 1h\n  timeout server 1h\n  retries 3\n  option redispatch 1\n'
    printf 'frontend devices\n  bind 127.0.0.1:%s\n  default_backend replicas\n' "$LB_PORT"
    # Round robin: a killed replica gets its share of new connections
    # until its checks mark it down (10 s at most), each refused at once
    # and redispatched to another, so devices do not notice. (leastconn
    # sends a dead replica, which holds no channel, every new connection;
    # marking it down on refused connections, `observe layer4 error-limit
    # N on-error mark-down`, also marked live replicas down for a moment in
    # the 100 000-session runs, their connects timing out on the starved
    # machine, even with N = 50.)
    printf 'backend replicas\n  balance roundrobin\n'
    for r in $(seq "$REPLICAS"); do
        printf '  server r%s %s source 127.3.%s.%s check inter 5s fall 2 rise 2\n' \
            "$r" "${DEVICE_ADDRS[$((r - 1))]}" "$b" "$r"
    done
}
# HAProxy processes on one port (SO_REUSEPORT), in front of DEVICE_ADDRS.
start_balancers() {
    echo "== $BALANCERS HAProxy process(es) on one port (SO_REUSEPORT)" >&2
    LB_PORT=$(free_port)
    BALANCER_PIDS=()
    for b in $(seq "$BALANCERS"); do
        balancer_config "$b" >"$WORK/haproxy-$b.cfg"
        haproxy -db -f "$WORK/haproxy-$b.cfg" >"$WORK/haproxy-$b.log" 2>&1 &
        PIDS+=($!)
        BALANCER_PIDS+=($!)
    done
    for _ in $(seq 100); do
        [ "$(ss -Hltn "sport = :$LB_PORT" | wc -l)" -ge "$BALANCERS" ] && break
        sleep 0.1
    done
    [ "$(ss -Hltn "sport = :$LB_PORT" | wc -l)" -ge "$BALANCERS" ] || {
        cat "$WORK"/haproxy-*.log >&2
        die "HAProxy did not listen on 127.0.0.1:$LB_PORT"
    }
}
