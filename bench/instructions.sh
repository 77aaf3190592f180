#!/usr/bin/env bash
# User-space instructions per command of qmpkit's client, with callgrind:
# (instructions for 2N commands - for N) / N, so start-up and the handshake
# cancel out. Repeatable on a noisy machine, unlike timings.
#
# Usage: bench/instructions.sh                 (QEMU and the floor's fake server, depth 1)
#        N=5000 DEPTH=64 bench/instructions.sh
#        SERVERS=fake APIS=status EXTRA=--monitor bench/instructions.sh   (through a Monitor)
#        SERVERS= EVENTS=100000 bench/instructions.sh                     (per event only)
#        FLOORS=1 SERVERS=fake APIS=status N=5000 bench/instructions.sh  (with the floors)
# Each row runs `qmpctl bench` with one API: the hand-written typed call
# (`Client::status`), the generated command (`--generated`, checked against
# the server's schema) and the raw JSON call (`--raw`).
#
# Floors (FLOORS=1): rows for clients that do less than qmpkit, measured the
# same way against the fake server at $DEPTH, so that qmpkit's own overhead
# can be told from what any client on tokio pays:
#   floor: raw                the floor's blocking client (std, no tokio, no JSON)
#   floor: tokio inline       tokio-floor: one task writes and reads lines itself:
#                             tokio's I/O, reactor and parking alone
#   floor: tokio task         plus a connection task that owns the socket, an
#                             mpsc channel to it and a oneshot back per command
#   floor: tokio task-decode  plus serde_json decoding each reply into a typed struct:
#                             the floor for a typed, pipelining client on tokio
#   floor: tokio task-decode-timer
#                             plus one timer pending in the runtime, as in any
#                             program with a timeout or a periodic poll (qmpkit's
#                             connection keeps one for its deadlines)
# tokio-floor (bench/tokio-floor, a workspace of its own) is built out of tree
# in ${TMPDIR:-/tmp}/qmpkit-tokio-floor-target; its modes are described in
# its src/main.rs. Run it by hand with
#   tokio-floor SOCKET N DEPTH inline|task|task-decode   (against `fakeqmp SOCKET`)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${QMP_SHARED:-$root/../shared}
N=${N:-2000}
DEPTH=${DEPTH:-1}
SERVERS=${SERVERS-qemu fake}      # which servers to measure against (empty: none, for EVENTS alone)
APIS=${APIS:-status generated raw} # which of the three APIs
EXTRA=${EXTRA:-}                  # more qmpctl bench flags, e.g. --monitor
FLOORS=${FLOORS:-}                # 1: also the floors (raw, tokio-floor's modes), on the fake server
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

floor_target=${TMPDIR:-/tmp}/qmpkit-floor-target
CARGO_TARGET_DIR=$floor_target cargo build -q --release --manifest-path "$shared/bench/floor/Cargo.toml"
cargo build -q --release -p qmpctl --manifest-path "$root/Cargo.toml"
qmpctl=${CARGO_TARGET_DIR:-$root/target}/release/qmpctl
# A workspace of its own, so a target of its own too, out of tree as the floor's.
tokio_floor_target=${TMPDIR:-/tmp}/qmpkit-tokio-floor-target
if [ -n "$FLOORS" ]; then
    CARGO_TARGET_DIR=$tokio_floor_target cargo build -q --release --manifest-path "$root/bench/tokio-floor/Cargo.toml"
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# Only the servers asked for are started (the floors run on the fake one).
case " $SERVERS ${FLOORS:+fake} " in *" fake "*) "$floor_target/release/fakeqmp" "$work/fake.sock" & pids+=($!) ;; esac
case " $SERVERS " in *" qemu "*)
    qemu-system-x86_64 -machine q35,accel=tcg -m 128M -nodefaults -display none -S \
        -qmp "unix:$work/qemu.sock,server=on,wait=off" 2>"$work/qemu.log" & pids+=($!) ;;
esac
for s in $SERVERS ${FLOORS:+fake}; do
    for _ in $(seq 200); do [ -S "$work/$s.sock" ] && break; sleep 0.05; done
done

total() { # command args...: the user-space instructions it runs
    # A failed run would otherwise read as 0 instructions, and its row as a figure.
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$@" >/dev/null 2>"$work/valgrind.log" ||
        { grep -v "^==" "$work/valgrind.log" | tail -5 >&2; echo "failed: $*" >&2; return 1; }
    callgrind_annotate "$work/cg.out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,
}

instructions() { # socket count flags...
    local sock=$1 n=$2
    shift 2
    total "$qmpctl" --socket "$sock" bench --count "$n" --depth "$DEPTH" "$@"
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

# The floors (FLOORS=1; see the top of this file), by the same 2N - N.
if [ -n "$FLOORS" ]; then
    a=$(total "$floor_target/release/raw" "$work/fake.sock" "$N" "$DEPTH")
    b=$(total "$floor_target/release/raw" "$work/fake.sock" $((2 * N)) "$DEPTH")
    printf '| %s | %s | %s | %s |\n' fake "$DEPTH" "floor: raw" $(((b - a) / N))
    for mode in inline task task-decode task-decode-timer; do
        a=$(total "$tokio_floor_target/release/tokio-floor" "$work/fake.sock" "$N" "$DEPTH" "$mode")
        b=$(total "$tokio_floor_target/release/tokio-floor" "$work/fake.sock" $((2 * N)) "$DEPTH" "$mode")
        printf '| %s | %s | %s | %s |\n' fake "$DEPTH" "floor: tokio $mode" $(((b - a) / N))
    done
fi

# Per event, with EVENTS=K: K and 2K events to one subscriber (the floor's
# fake server sends them in a burst after the handshake).
if [ -n "${EVENTS:-}" ]; then
    for k in "$EVENTS" $((2 * EVENTS)); do
        EVENTS=$k EVENTS_DELAY_MS=2000 "$floor_target/release/fakeqmp" "$work/events$k.sock" & pids+=($!)
        for _ in $(seq 200); do [ -S "$work/events$k.sock" ] && break; sleep 0.05; done
    done
    per_run() { # k
        total "$qmpctl" --socket "$work/events$1.sock" bench --events "$1"
    }
    a=$(per_run "$EVENTS")
    b=$(per_run $((2 * EVENTS)))
    printf '\nevents to one subscriber: %s instructions per event\n' $(((b - a) / EVENTS))
fi
