#!/usr/bin/env bash
# Regenerate docs/closewait-trace_example.txt: run the real tool on the seed
# scenario (../shared/seed-closewait.txt: a forking socat listener whose
# children stop themselves, five clients that give up after a second) and a
# C server that reads each connection to its end and never closes it, then
# put the real output into the commentary of scripts/closewait-trace_example.txt.in
# (each line @@NAME@@ there is replaced by the command run and what it printed).
#
#   scripts/make-example.sh [OUTPUT]     as root; default docs/closewait-trace_example.txt
#
# Needs what `scripts/setup.sh test` installs (socat, gcc). The tool run is
# $CLOSEWAIT_TRACE when set (e.g. /usr/sbin/closewait-trace), else this tree's
# package through $PYTHON (default .venv/bin/python, else python3).
# Takes about 30 seconds. Kills only the processes it started.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/docs/closewait-trace_example.txt}
template=$here/scripts/closewait-trace_example.txt.in

if [ "$(id -u)" -ne 0 ]; then
    echo "make-example: needs root (the live tracer loads BPF): run it as root, or with sudo" >&2
    exit 3
fi
for tool in socat gcc ss; do
    command -v "$tool" >/dev/null || {
        echo "make-example: $tool is missing (scripts/setup.sh test installs it)" >&2; exit 2; }
done

python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
if [ -n "${CLOSEWAIT_TRACE:-}" ]; then
    cwt=("$CLOSEWAIT_TRACE")
else
    export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
    cwt=("$python" -m closewait_trace)
fi

work=$(mktemp -d /tmp/make-example.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        # the socat listener's children (stopped) first, then what we started
        for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do kill -KILL "$c" 2>/dev/null || true; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"     # KEEP_WORK=1: keep it, to look into
}
trap 'cleanup 2>/dev/null' EXIT

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {    # wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds
    local what=$1 left=$(( $2 * 10 )); shift 2
    until "$@"; do
        left=$((left - 1))
        [ "$left" -gt 0 ] || { echo "make-example: timed out waiting for $what" >&2; exit 1; }
        sleep 0.1
    done
}
listening() { ss -Htln | grep -q ":$1 "; }
lines_at_least() { [ "$(grep -c -- "$1" "$work/live.out")" -ge "$2" ]; }   # PATTERN N

# capture NAME ARGS...: run closewait-trace ARGS in the work directory; the
# example shows "# closewait-trace ARGS" (exactly what ran) and its output.
show() { local name=$1; shift; printf '# closewait-trace %s\n' "$*" > "$work/$name.cmd"; }
capture() {
    local name=$1; shift
    show "$name" "$@"
    (cd "$work" && exec "${cwt[@]}" "$@") > "$work/$name.out" 2>&1
}

seed_port=$(free_port)
eof_port=$(free_port)
while [ "$eof_port" = "$seed_port" ]; do eof_port=$(free_port); done
ports="$seed_port,$eof_port"

# The C server of tests/kernel/data/eof_server.c, built with -g as a
# developer's build is (its file:line is then named).
gcc -g -O2 -o "$work/eof_server" "$here/tests/kernel/data/eof_server.c"

# 1. The live tail, recording as it goes (as the service does).
show live -p "$ports" -w incident.jsonl
(cd "$work" && exec "${cwt[@]}" -p "$ports" -w incident.jsonl) > "$work/live.out" 2>&1 &
live=$!
pids+=("$live")
wait_for "the live tracer's header" 120 grep -qs '^TIME ' "$work/live.out"

# 2. The incident: the seed scenario, and two requests to the EOF server.
socat "tcp4-listen:$seed_port,reuseaddr,fork" 'system:kill -STOP $SOCAT_PID' &
pids+=("$!")
seed=$!
wait_for "socat listening" 20 listening "$seed_port"
for _ in 1 2 3 4 5; do socat -T 1 -u "tcp4:127.0.0.1:$seed_port" - || true; done
"$work/eof_server" "$eof_port" > /dev/null &
pids+=("$!")
wait_for "eof_server listening" 20 listening "$eof_port"
for _ in 1 2; do printf 'GET / HTTP/1.0\r\n\r\n' | socat -u - "tcp4:127.0.0.1:$eof_port"; done
wait_for "seven LINGER lines" 30 lines_at_least ' LINGER ' 7

# 3. What an on-call runs in the incident, while the live tail goes on.
capture snapshot_plain snapshot -p "$ports"
capture snapshot snapshot -v -p "$eof_port"
capture top top -p "$ports" -n 2

# 4. The stopped children killed (their sockets close), then Ctrl-C.
for c in $(ps -o pid= --ppid "$seed"); do kill -KILL "$c"; done
wait_for "five CLOSED lines" 20 lines_at_least ' CLOSED ' 5
kill -INT "$live"
wait "$live" || { echo "make-example: the live tracer exited $?" >&2; exit 1; }

# 5. Afterwards, from the recording (no root needed).
capture report report incident.jsonl
capture report_code report --by code,cause incident.jsonl
capture replay -r incident.jsonl --comm eof

"$python" - "$template" "$work" "$out" <<'EOF'
import pathlib, re, sys
template, work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])

def block(m):
    name = m.group(1)
    text = (work / f"{name}.cmd").read_text() + (work / f"{name}.out").read_text()
    return "\n".join(("    " + line).rstrip() for line in text.rstrip("\n").split("\n"))

text = re.sub(r"^@@(\w+)@@$", block, template.read_text(), flags=re.M)
assert "@@" not in text, "a placeholder left unfilled"
out.write_text(text)
print(f"make-example: wrote {out}", file=sys.stderr)
EOF
