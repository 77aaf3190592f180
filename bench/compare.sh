#!/usr/bin/env bash
# Measures qmpkit against the floor client (../shared/bench/floor) in one run
# on one machine: the floor's instant fake server at depths 1, 8 and 64, a real
# QEMU at depths 1 and 8 (the floor with OOB), and events per second.
# Each figure is the median of ROUNDS interleaved runs; ratios are qmpkit / floor.
#
# Usage: bench/compare.sh            (N=20000 fake, 5000 QEMU, ROUNDS=3)
#        N=50000 QEMU_N=10000 ROUNDS=5 bench/compare.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${QMP_SHARED:-$root/../shared}
N=${N:-20000}
QEMU_N=${QEMU_N:-5000}
ROUNDS=${ROUNDS:-3}
EVENTS=${EVENTS:-200000}

floor_target=${TMPDIR:-/tmp}/qmpkit-floor-target
echo "building the floor (out of tree) and qmpctl (release)..." >&2
CARGO_TARGET_DIR=$floor_target cargo build -q --release --manifest-path "$shared/bench/floor/Cargo.toml"
cargo build -q --release -p qmpctl --manifest-path "$root/Cargo.toml"
raw=$floor_target/release/raw
fakeqmp=$floor_target/release/fakeqmp
qmpctl=${CARGO_TARGET_DIR:-$root/target}/release/qmpctl

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_socket() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "no socket at $1" >&2
    exit 1
}

"$fakeqmp" "$work/fake.sock" & pids+=($!)
EVENTS=$EVENTS EVENTS_DELAY_MS=300 "$fakeqmp" "$work/events.sock" & pids+=($!)
qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 128M -nodefaults -display none -S \
    -qmp "unix:$work/qemu.sock,server=on,wait=off" 2>"$work/qemu.log" & pids+=($!)
wait_socket "$work/fake.sock"
wait_socket "$work/events.sock"
wait_socket "$work/qemu.sock"

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '| server | depth | n | floor µs/cmd | qmpkit µs/cmd | ratio |\n| --- | --- | --- | --- | --- | --- |\n'
# Both clients negotiate the same capabilities in each row: without oob
# against the fake server (as the floor does by default), with oob against
# QEMU (OOB=1 for the floor; qmpkit negotiates it whenever QEMU offers it).
# With oob, qmpkit keeps at most 8 in-band commands in QEMU's queue so that
# an exec-oob command is never stuck behind them: the last fake row shows
# what that costs at depth 64 against a server that has no such queue.
row() { # server socket n depth floor-env qmpctl-flags
    local server=$1 sock=$2 n=$3 depth=$4 floor_env=$5 flags=$6 f=() q=()
    for _ in $(seq "$ROUNDS"); do
        f+=("$(env $floor_env "$raw" "$sock" "$n" "$depth" | field us_per_cmd)")
        q+=("$("$qmpctl" --socket "$sock" --json bench --count "$n" --depth "$depth" $flags | field us_per_cmd)")
    done
    local fm qm
    fm=$(printf '%s\n' "${f[@]}" | median)
    qm=$(printf '%s\n' "${q[@]}" | median)
    printf '| %s | %s | %s | %s | %s | %.2f |\n' "$server" "$depth" "$n" "$fm" "$qm" "$(awk "BEGIN {print $qm / $fm}")"
}
row fakeqmp "$work/fake.sock" "$N" 1 "" --no-oob
row fakeqmp "$work/fake.sock" "$N" 8 "" --no-oob
row fakeqmp "$work/fake.sock" "$N" 64 "" --no-oob
row "fakeqmp (oob, ≤8 queued)" "$work/fake.sock" "$N" 64 "OOB=1" ""
row "QEMU $(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p')" "$work/qemu.sock" "$QEMU_N" 1 "OOB=1" ""
row "QEMU (oob)" "$work/qemu.sock" "$QEMU_N" 8 "OOB=1" ""

# Two qmpkit variants against each other, interleaved in one run: the
# figure is the ratio of their medians (issue #16: tokio's default
# multi-thread runtime within 1.25 x the one-thread one; the Monitor's
# command path adds nothing measurable to the bare client's).
pair() { # label depth flags-a flags-b
    local label=$1 depth=$2 fa=$3 fb=$4 a=() b=()
    for _ in $(seq "$ROUNDS"); do
        a+=("$("$qmpctl" --socket "$work/fake.sock" --json bench --count "$N" --depth "$depth" --no-oob $fa | field us_per_cmd)")
        b+=("$("$qmpctl" --socket "$work/fake.sock" --json bench --count "$N" --depth "$depth" --no-oob $fb | field us_per_cmd)")
    done
    local am bm
    am=$(printf '%s\n' "${a[@]}" | median)
    bm=$(printf '%s\n' "${b[@]}" | median)
    printf '| %s | %s | %s | %s | %.2f |\n' "$label" "$depth" "$am" "$bm" "$(awk "BEGIN {print $bm / $am}")"
}
printf '\n| fakeqmp, qmpkit against itself | depth | µs/cmd | µs/cmd | ratio |\n| --- | --- | --- | --- | --- |\n'
for d in 1 8 64; do pair "one-thread runtime, then tokio's default multi-thread" "$d" "" "--multi-thread"; done
for d in 1 64; do pair "bare Client, then Monitor" "$d" "" "--monitor"; done
for d in 1 8 64; do pair "multi-thread: bare Client, then Monitor" "$d" "--multi-thread" "--multi-thread --monitor"; done

# A typed call against the raw call it wraps (issue: typed costs no more).
t=(); r=()
for _ in $(seq "$ROUNDS"); do
    t+=("$("$qmpctl" --socket "$work/fake.sock" --json bench --count "$N" --depth 1 --no-oob | field us_per_cmd)")
    r+=("$("$qmpctl" --socket "$work/fake.sock" --json bench --count "$N" --depth 1 --no-oob --raw | field us_per_cmd)")
done
tm=$(printf '%s\n' "${t[@]}" | median)
rm_=$(printf '%s\n' "${r[@]}" | median)
printf '\ntyped Client::status: %s µs/cmd; raw execute_raw("query-status"): %s µs/cmd (typed/raw %.2f)\n' \
    "$tm" "$rm_" "$(awk "BEGIN {print $tm / $rm_}")"

# The generated command (`Client::execute(&QueryStatus)`, checked against
# QEMU's schema) against the raw call, on QEMU, where the check is active.
g=(); r=()
for _ in $(seq "$ROUNDS"); do
    g+=("$("$qmpctl" --socket "$work/qemu.sock" --json bench --count "$QEMU_N" --depth 1 --generated | field us_per_cmd)")
    r+=("$("$qmpctl" --socket "$work/qemu.sock" --json bench --count "$QEMU_N" --depth 1 --raw | field us_per_cmd)")
done
gm=$(printf '%s\n' "${g[@]}" | median)
rm_=$(printf '%s\n' "${r[@]}" | median)
printf 'generated QueryStatus on QEMU: %s µs/cmd; raw: %s µs/cmd (generated/raw %.2f)\n' \
    "$gm" "$rm_" "$(awk "BEGIN {print $gm / $rm_}")"

e=()
for _ in $(seq "$ROUNDS"); do
    e+=("$("$qmpctl" --socket "$work/events.sock" --json bench --events "$EVENTS" | field us_per_event)")
done
em=$(printf '%s\n' "${e[@]}" | median)
printf '\nevents: %s µs per event to one subscriber (%s events/s), median of %s runs of %s\n' \
    "$em" "$(awk "BEGIN {printf \"%.0f\", 1e6 / $em}")" "$ROUNDS" "$EVENTS"
