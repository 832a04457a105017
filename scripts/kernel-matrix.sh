#!/usr/bin/env bash
# Run closewait-trace's seed scenario and kernel tests on other kernels:
# each kernel boots in QEMU (no KVM needed: TCG) with virtme-ng, this
# machine's root shared read-only over 9p, and writes its results to a
# directory shared read-write. One line per kernel, then a Markdown table
# for docs/kernels.md.
#
#   scripts/kernel-matrix.sh [options] KVER...
#     KVER          a Debian kernel release, e.g. 6.1.0-57-amd64 or
#                   6.12.117+deb12-amd64 (its linux-image package is installed)
#     --no-headers  do not install linux-headers-KVER (the tool then uses the
#                   generic tree it finds, as on a cloud kernel)
#     --tests ARGS  pytest arguments for the guest (default: tests/kernel
#                   but test_wheel.py, which needs PyPI; guests have no network)
#     --stretch N   CLOSEWAIT_TEST_STRETCH in the guest (default 50: TCG is slow)
#     --out DIR     results (default: /var/tmp/closewait-kernel-matrix)
#     --parallel    boot all kernels at once instead of one after the other
#     --only-tests  skip the start-up measurement and the seed scenario step
#     --timeout S   stop the guest's tests after S seconds (default 10800);
#                   the tests that ended by then are in tests.txt, one a line
#
# Needs root (apt, BPF in the guest). Installs qemu-system-x86, busybox-static
# (virtme-ng's initramfs), tiny-initramfs (the kernel packages need an
# initramfs tool; initramfs-tools would pull in udev and upgrade systemd on
# the host) and virtme-ng (PyPI, in its own venv: Debian 12 has no package).
# vng exits 255 on machines without udev whatever happens in the guest, so
# results are read from files the guest writes, never from vng's status.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VNG_VENV=/opt/closewait-trace-matrix
OUT=/var/tmp/closewait-kernel-matrix
STRETCH=${STRETCH:-50}
# test_wheel.py builds the wheel with hatchling from PyPI: the guests have
# no network (its kernel part, the seed scenario, runs anyway).
TESTS=${TESTS:-tests/kernel --ignore=tests/kernel/test_wheel.py}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-10800}   # seconds the guest's pytest may run (--timeout)
HEADERS=1
PARALLEL=0
ONLY_TESTS=0
KERNELS=()

die() { echo "kernel-matrix: $*" >&2; exit 2; }

# ---------------------------------------------------------------- the guest
# Runs inside the VM: `kernel-matrix.sh --guest RESULTDIR`.
guest() {
    local dir=$1
    # shellcheck disable=SC1091
    . "$dir/guest.env"          # PY, STRETCH, TESTS (see boot)
    cd "$REPO" || exit 1        # the snapshot taken at start (see boot)
    export PYTHONDONTWRITEBYTECODE=1 CLOSEWAIT_TEST_STRETCH="$STRETCH" TMPDIR=/tmp
    export PYTHONPATH="$REPO/src"
    unset CI
    local py="$PY"
    {
        echo "kernel=$(uname -r)"
        echo "python=$($py --version 2>&1)"
    } > "$dir/guest.txt"
    if [ "${ONLY_TESTS:-0}" = 1 ]; then
        tests_only "$py" "$dir"
        return
    fi
    # Start-up: launch to the start record, as a user sees it; -v names the
    # header tree, transport, clock and map read.
    local t0 t1
    t0=$(date +%s.%N)
    timeout 900 "$py" -m closewait_trace -v --json -t 1s > "$dir/startup.jsonl" 2> "$dir/startup.err" &
    local pid=$!
    for _ in $(seq 1 1800); do
        grep -q '"type": "start"' "$dir/startup.jsonl" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    t1=$(date +%s.%N)
    echo "startup_s=$(echo "$t1 - $t0" | bc)" >> "$dir/guest.txt"
    kill -INT "$pid" 2>/dev/null
    wait "$pid"
    echo "startup_rc=$?" >> "$dir/guest.txt"
    # The seed scenario (../shared/seed-closewait.txt), then the tests.
    timeout 3600 "$py" -m pytest -p no:cacheprovider -q -rf \
        "tests/kernel/test_live.py::test_seed_scenario_five_stopped_socat_children" \
        > "$dir/seed.txt" 2>&1
    echo "seed_rc=$?" >> "$dir/guest.txt"
    tests_only "$py" "$dir"
}

tests_only() {
    local py=$1 dir=$2
    # TESTS is pytest's arguments as a shell would take them (-k "a or b").
    eval "set -- $TESTS"
    # -v: one line per test as it ends, so that a run cut short by the
    # timeout still says which tests passed.
    timeout "${GUEST_TIMEOUT:-10800}" "$py" -m pytest -p no:cacheprovider -v -rf \
        --durations=0 "$@" --junitxml="$dir/tests.xml" > "$dir/tests.txt" 2>&1
    echo "tests_rc=$?" >> "$dir/guest.txt"
    echo "done=1" >> "$dir/guest.txt"
}

# ----------------------------------------------------------------- the host
install_tools() {
    local pkgs=(qemu-system-x86 busybox-static tiny-initramfs bc)
    for k in "${KERNELS[@]}"; do
        pkgs+=("linux-image-$k")
        [ "$HEADERS" = 1 ] && pkgs+=("linux-headers-$k")
    done
    flock /tmp/apt.lock apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
        || die "apt-get install failed: ${pkgs[*]}"
    if [ ! -x "$VNG_VENV/bin/vng" ]; then
        python3 -m venv "$VNG_VENV" && "$VNG_VENV/bin/pip" install -q virtme-ng \
            || die "could not install virtme-ng from PyPI"
    fi
    [ -x "$REPO/.venv/bin/python" ] || bash "$REPO/scripts/setup.sh" \
        || die "scripts/setup.sh failed"
}

boot() {
    local k=$1 dir="$OUT/$1"
    rm -rf "$dir" && mkdir -p "$dir/source" /var/cache/closewait-trace
    chmod 700 /var/cache/closewait-trace
    # The guest runs a snapshot of the committed tree, so that editing the
    # checkout during a (long) run does not change what it tests. It lives
    # in the shared directory: the guest has its own /tmp and /var/tmp.
    git -C "$REPO" archive HEAD | tar -x -C "$dir/source" || die "could not snapshot $REPO"
    # Byte-compiled here, by the interpreter the guest runs: every tracer a
    # test starts would otherwise compile the package again at TCG speed.
    "$REPO/.venv/bin/python" -m compileall -q "$dir/source/src" "$dir/source/tests" >/dev/null \
        || die "could not byte-compile the snapshot"
    local start
    start=$(date +%s)
    # The header cache is shared read-write: a fresh guest would otherwise
    # rebuild it (minutes under TCG).
    # The guest's settings go in a file: vng's --exec does not survive
    # quotes (a pytest -k expression has them).
    printf 'PY=%q\nSTRETCH=%q\nTESTS=%q\nONLY_TESTS=%q\nGUEST_TIMEOUT=%q\n' \
        "$REPO/.venv/bin/python" "$STRETCH" "$TESTS" "$ONLY_TESTS" "$GUEST_TIMEOUT" \
        > "$dir/guest.env"
    # The guest's own limits (start-up 900 s, seed scenario 3600 s, the tests
    # GUEST_TIMEOUT) and half an hour to boot and shut down: the host never
    # cuts a guest that is still within them.
    local host_limit=$(( 900 + 3600 + GUEST_TIMEOUT + 1800 ))
    PATH="$VNG_VENV/bin:$PATH" timeout "$host_limit" vng --run "/boot/vmlinuz-$k" \
        --disable-kvm --force-9p --memory 2G --cpus 2 \
        --rwdir="$dir" --rwdir=/var/cache/closewait-trace \
        --exec "bash $dir/source/scripts/kernel-matrix.sh --guest $dir > $dir/guest.log 2>&1" \
        > "$dir/vng.log" 2>&1
    echo "vng_rc=$? wall_s=$(( $(date +%s) - start ))" > "$dir/host.txt"
}

field() { sed -n "s/^$2=//p" "$1" 2>/dev/null | tail -1; }

summarize() {
    local k=$1 dir="$OUT/$1" g="$OUT/$1/guest.txt"
    local seed tests startup transport headers passed failed errors rc
    if [ ! -s "$g" ] || [ ! -s "$dir/tests.txt" ]; then
        echo "| $k | did not finish: see $dir/vng.log and guest.log | | | | |"
        return
    fi
    transport=$(grep -o 'kernel headers: .*; compiled' "$dir/startup.err" 2>/dev/null \
                | sed 's/.*); //; s/; compiled//' | tail -1)
    headers=$(grep -o '"headers": "[a-z]*' "$dir/startup.jsonl" 2>/dev/null | sed 's/.*"//')
    startup=$(field "$g" startup_s)
    startup=${startup:+$(printf '%.0f s' "$startup")}
    case $(field "$g" seed_rc) in
        "") seed="not run (--only-tests)" ;;
        0) seed=pass ;;
        *) seed="FAIL (seed.txt)" ;;
    esac
    # One line per test (pytest -v): counted even when the run was cut.
    passed=$(grep -c ' PASSED' "$dir/tests.txt")
    failed=$(grep -c ' FAILED' "$dir/tests.txt")
    errors=$(grep -c ' ERROR' "$dir/tests.txt")
    rc=$(field "$g" tests_rc)
    tests="$passed passed, $failed failed"
    [ "$errors" -gt 0 ] && tests="$tests, $errors errors"
    case $rc in
        0|1) ;;
        124) tests="$tests (cut at --timeout)" ;;
        *) tests="$tests (pytest exit ${rc:-unknown})" ;;
    esac
    printf '| %s | %s | %s | %s | %s | %s |\n' "$k" "${transport:-?}" "${headers:-?}" \
        "$seed" "$tests" "${startup:--}"
}

main() {
    while [ $# -gt 0 ]; do
        case $1 in
            --guest) guest "$2"; exit 0 ;;
            --no-headers) HEADERS=0 ;;
            --tests) TESTS=$2; shift ;;
            --stretch) STRETCH=$2; shift ;;
            --out) OUT=$2; shift ;;
            --parallel) PARALLEL=1 ;;
            --only-tests) ONLY_TESTS=1 ;;
            --timeout) GUEST_TIMEOUT=$2; shift ;;
            -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) KERNELS+=("$1") ;;
        esac
        shift
    done
    [ ${#KERNELS[@]} -gt 0 ] || die "name at least one kernel, e.g. 6.1.0-57-amd64"
    [[ "$GUEST_TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds, e.g. 7200"
    [[ "$STRETCH" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--stretch takes a number, e.g. 50"
    [ "$(id -u)" = 0 ] || die "run as root"
    install_tools
    mkdir -p "$OUT"
    for k in "${KERNELS[@]}"; do
        if [ "$PARALLEL" = 1 ]; then boot "$k" & else boot "$k"; fi
    done
    wait
    echo "| kernel | transport, clock, map read | headers | seed scenario | tests | start-up |"
    echo "|---|---|---|---|---|---|"
    for k in "${KERNELS[@]}"; do summarize "$k"; done
}

main "$@"
