#!/usr/bin/env bash
# User-space instructions per command of qmpkit's client, with callgrind:
# (instructions for 2N commands - for N) / N, so start-up and the handshake
# cancel out. Repeatable on a noisy machine, unlike timings.
#
# Usage: bench/instructions.sh                 (QEMU and the floor's fake server, depth 1)
#        N=5000 DEPTH=64 bench/instructions.sh
#        SERVERS=fake APIS=status EXTRA=--monitor bench/instructions.sh   (through a Monitor)
#        SERVERS= EVENTS=100000 bench/instructions.sh                     (per event only)
# Each row runs `qmpctl bench` with one API: the hand-written typed call
# (`Client::status`), the generated command (`--generated`, checked against
# the server's schema) and the raw JSON call (`--raw`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${QMP_SHARED:-$root/../shared}
N=${N:-2000}
DEPTH=${DEPTH:-1}
SERVERS=${SERVERS:-qemu fake}     # which servers to measure against
APIS=${APIS:-status generated raw} # which of the three APIs
EXTRA=${EXTRA:-}                  # more qmpctl bench flags, e.g. --monitor
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

floor_target=${TMPDIR:-/tmp}/qmpkit-floor-target
CARGO_TARGET_DIR=$floor_target cargo build -q --release --manifest-path "$shared/bench/floor/Cargo.toml"
cargo build -q --release -p qmpctl --manifest-path "$root/Cargo.toml"
qmpctl=${CARGO_TARGET_DIR:-$root/target}/release/qmpctl

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$floor_target/release/fakeqmp" "$work/fake.sock" & pids+=($!)
qemu-system-x86_64 -machine q35,accel=tcg -m 128M -nodefaults -display none -S \
    -qmp "unix:$work/qemu.sock,server=on,wait=off" 2>"$work/qemu.log" & pids+=($!)
for s in fake qemu; do
    for _ in $(seq 200); do [ -S "$work/$s.sock" ] && break; sleep 0.05; done
done

instructions() { # socket count flags...
    local sock=$1 n=$2
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
        "$qmpctl" --socket "$sock" bench --count "$n" --depth "$DEPTH" "$@" >/dev/null 2>"$work/valgrind.log"
    callgrind_annotate "$work/cg.out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,
}

printf '| server | depth | API | instructions per command |\n| --- | --- | --- | --- |\n'
for server in $SERVERS; do
    flags=()
    [ "$server" = fake ] && flags=(--no-oob)
    for api in $APIS; do
        extra=($EXTRA)
        [ "$api" != status ] && extra+=("--$api")
        a=$(instructions "$work/$server.sock" "$N" "${flags[@]}" "${extra[@]}")
        b=$(instructions "$work/$server.sock" $((2 * N)) "${flags[@]}" "${extra[@]}")
        printf '| %s | %s | %s | %s |\n' "$server" "$DEPTH" "$api" $(((b - a) / N))
    done
done

# Per event, with EVENTS=K: K and 2K events to one subscriber (the floor's
# fake server sends them in a burst after the handshake).
if [ -n "${EVENTS:-}" ]; then
    for k in "$EVENTS" $((2 * EVENTS)); do
        EVENTS=$k EVENTS_DELAY_MS=2000 "$floor_target/release/fakeqmp" "$work/events$k.sock" & pids+=($!)
        for _ in $(seq 200); do [ -S "$work/events$k.sock" ] && break; sleep 0.05; done
    done
    per_run() { # k
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
            "$qmpctl" --socket "$work/events$1.sock" bench --events "$1" >/dev/null 2>"$work/valgrind.log"
        callgrind_annotate "$work/cg.out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,
    }
    a=$(per_run "$EVENTS")
    b=$(per_run $((2 * EVENTS)))
    printf '\nevents to one subscriber: %s instructions per event\n' $(((b - a) / EVENTS))
fi
