#!/usr/bin/env bash
# closewait-trace's unit under a real systemd (issue 19 §2): a Debian 12 disk
# image with systemd as PID 1, built with mmdebstrap from Debian's packages,
# boots in QEMU (TCG: no KVM needed), installs the package that
# scripts/build-deb.sh builds from this checkout, and runs the service the
# way the README says: enable --now, the seed scenario, the recording, the
# metrics scrape, stop (summary, exit 0), start again (the previous run
# kept), systemd-analyze security, a configuration error that must not
# restart in a loop, and a stop during start-up. One line per check, then a
# Markdown block for docs/kernels.md (docs/kernels.md, "Under a real
# systemd"). Not part of CI: the boot and bcc's compile under TCG take
# minutes.
#
#   scripts/systemd-vm.sh [options]
#     --out DIR      results (default: /var/tmp/closewait-systemd-vm/run)
#     --rebuild      build the disk image again (cached under
#                    /var/tmp/closewait-systemd-vm: Debian 12 with systemd,
#                    linux-image-amd64 and linux-headers-amd64 from bookworm,
#                    python3-bpfcc and the package's other dependencies)
#     --build-only   build the disk image again, boot nothing
#     --mirror URL   Debian mirror (default: http://deb.debian.org/debian)
#     --timeout S    stop the guest after S seconds (default 5400)
#     --memory M     guest memory in MiB (default 2048)
#
# Needs root (mmdebstrap, the image's files). Installs mmdebstrap,
# qemu-system-x86, qemu-utils and e2fsprogs with apt-get if missing. The guest
# has no network: the .deb's dependencies are in the image, so the
# `apt install ./closewait-trace_*.deb` it runs reaches no mirror.
# The guest writes its results to a directory shared over 9p (OUT/shared);
# QEMU's serial console (the guest's boot and the check's own output) is in
# OUT/console.log.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=/var/tmp/closewait-systemd-vm
OUT=$CACHE/run
MIRROR=http://deb.debian.org/debian
GUEST_TIMEOUT=5400
MEMORY=2048
REBUILD=0
IMAGE_SIZE=6G
# Everything the guest runs, installed when the image is built: the .deb's
# Depends and Recommends (see debian/control), the seed scenario's socat,
# curl for the scrape, and what a Debian 12 server boots with.
PACKAGES=(systemd systemd-sysv udev kmod initramfs-tools linux-image-amd64
          linux-headers-amd64 python3 python3-bpfcc python3-click
          python3-pyelftools python3-prometheus-client python3-rich
          bash-completion socat curl procps iproute2 gzip)
METRICS=127.0.0.1:9477        # --metrics in packaging/systemd/closewait-trace.service
SEED_PORT=5555                # ../shared/seed-closewait.txt

die() { echo "systemd-vm: $*" >&2; exit 2; }
say() { echo "systemd-vm: $*" >&2; }

# ---------------------------------------------------------------- the guest
# Runs inside the VM, from closewait-vm-check.service (see build_image):
# `systemd-vm.sh --guest /mnt/shared`. Each check appends one line
# "NAME|pass or FAIL|figure" to $dir/checks.txt; facts go to $dir/guest.txt.
UNIT=closewait-trace
STATE=/var/lib/closewait-trace

check() {           # check NAME pass|FAIL FIGURE
    echo "$1|$2|$3" >> "$DIR/checks.txt"
    echo "check: $2: $1: $3"
}
fact() { echo "$1=$2" >> "$DIR/guest.txt"; }
since() { echo $(( $(date +%s) - $1 )); }

# wait_for SECONDS COMMAND...: until COMMAND succeeds (0) or the time is up (1).
wait_for() {
    local limit=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ "$(date +%s)" -ge "$limit" ] && return 1
        sleep 1
    done
}
# The recording as it is now (each batch is a gzip member: readable while written).
recording() { zcat "$STATE"/closewait.jsonl.gz* 2>/dev/null; }
has_start() { recording | grep -q '"type": *"start"'; }
is_failed() { [ "$(systemctl show -P ActiveState "$UNIT")" = failed ]; }
started_or_failed() { has_start || is_failed; }
lingering() {       # the sum of closewait_lingering_sockets for the seed port
    curl -fsS --max-time 10 "http://$METRICS/metrics" 2>/dev/null |
        awk -v port="port=\"$SEED_PORT\"" '/^closewait_lingering_sockets\{/ && index($0, port) { s += $NF }
                                          END { printf "%d\n", s }'
}
five_lingering() { [ "$(lingering)" = 5 ]; }

guest() {
    DIR=$1
    local t0 rc n deb out
    : > "$DIR/checks.txt"
    fact kernel "$(uname -r)"
    fact debian "$(cat /etc/debian_version)"
    fact systemd "$(systemctl --version | head -1)"
    fact pid1 "$(cat /proc/1/comm)"
    fact perf_event_paranoid "$(cat /proc/sys/kernel/perf_event_paranoid)"
    fact bcc "$(dpkg-query -W -f='${Version}' python3-bpfcc)"

    # 1. The package, as the README says, from the file alone (no network here).
    deb=$(cd "$DIR" && ls closewait-trace_*_all.deb | tail -1)
    cp "$DIR/$deb" /root/ && cd /root || return 1
    out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y "./$deb" 2>&1); rc=$?
    echo "$out" > "$DIR/apt.txt"
    check "apt install ./$deb" "$([ $rc = 0 ] && echo pass || echo FAIL)" \
        "exit $rc, version $(dpkg-query -W -f='${Version} ${db:Status-Abbrev}' closewait-trace 2>&1 | sed 's/ *$//')"
    [ $rc = 0 ] || return 1
    check "installed, not enabled" \
        "$([ "$(systemctl is-enabled $UNIT)" = disabled ] && echo pass || echo FAIL)" \
        "is-enabled: $(systemctl is-enabled $UNIT)"

    # 2. enable --now: started when the recording has its start record (the
    # program is attached and the sockets already lingering snapshotted).
    t0=$(date +%s)
    systemctl enable --now "$UNIT" > "$DIR/enable.txt" 2>&1; rc=$?
    wait_for 1800 started_or_failed
    if has_start; then
        check "systemctl enable --now" pass "exit $rc, attached (start record) after $(since "$t0") s"
    else
        check "systemctl enable --now" FAIL "exit $rc, $(systemctl show -P ActiveState $UNIT) after $(since "$t0") s"
    fi
    local headers
    headers=$(recording | grep -m1 '"type": *"start"' | python3 -c \
        'import json,sys; r=json.loads(sys.stdin.read()); print(r.get("headers",""))' 2>/dev/null)
    fact headers "$headers"
    # The running kernel's headers are installed (linux-headers-amd64): the
    # start record must name them, not say the kernel has none.
    check "start record names the running kernel's headers" \
        "$([[ $headers == *"headers of the running kernel $(uname -r)"* ]] && echo pass || echo FAIL)" \
        "$headers"

    # 3. The seed scenario (../shared/seed-closewait.txt): a forking socat
    # whose children stop themselves, five clients that give up after 1 s.
    setsid socat tcp4-listen:$SEED_PORT,reuseaddr,fork system:'kill -STOP $SOCAT_PID' \
        > /dev/null 2>&1 < /dev/null &
    local server=$!
    wait_for 60 sh -c "ss -Hltn 'sport = :$SEED_PORT' | grep -q ."
    for i in 1 2 3 4 5; do socat -T 1 -u tcp4:127.0.0.1:$SEED_PORT - < /dev/null > /dev/null; done
    n=$(ss -Htn state close-wait "sport = :$SEED_PORT" | wc -l)
    check "seed scenario: sockets in CLOSE_WAIT (ss)" "$([ "$n" = 5 ] && echo pass || echo FAIL)" "$n"

    # 4. The metrics scrape, as Prometheus would.
    t0=$(date +%s)
    wait_for 900 five_lingering
    n=$(lingering)
    curl -fsS --max-time 10 "http://$METRICS/metrics" > "$DIR/metrics.txt" 2>&1
    check "metrics: closewait_lingering_sockets (port $SEED_PORT)" \
        "$([ "$n" = 5 ] && echo pass || echo FAIL)" "$n, $(since "$t0") s after the clients"

    # 5. The recording under /var/lib/closewait-trace.
    wait_for 120 sh -c "[ \$(zcat $STATE/closewait.jsonl.gz* 2>/dev/null | grep -c '\"type\": *\"linger\"') -ge 5 ]"
    n=$(recording | grep -c '"type": *"linger"')
    check "recording: linger records in $STATE/closewait.jsonl.gz" \
        "$([ "$n" = 5 ] && echo pass || echo FAIL)" \
        "$n; $(stat -c '%a %U' "$STATE") dir, $(stat -c '%a %U' "$STATE/closewait.jsonl.gz") file"

    # 6. systemctl stop: SIGTERM, the summary in the journal, exit 0.
    t0=$(date +%s.%N)
    systemctl stop "$UNIT"; rc=$?
    local took status result journal
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    status=$(systemctl show -P ExecMainStatus "$UNIT")
    result=$(systemctl show -P Result "$UNIT")
    check "systemctl stop" "$([ $rc = 0 ] && [ "$status" = 0 ] && [ "$result" = success ] && echo pass || echo FAIL)" \
        "exit status $status, result $result, in $took s"
    journal=$(journalctl -b -u "$UNIT" --no-pager -o cat)
    echo "$journal" > "$DIR/journal-first-run.txt"
    # The seed's 5 still lingering; more entered CLOSE_WAIT (each scrape's
    # connection, closed by curl first, passes through it for milliseconds).
    check "journal: the stop summary" \
        "$(grep -q '^Summary after ' <<< "$journal" && grep -q '^Still lingering at exit: 5$' <<< "$journal" \
           && echo pass || echo FAIL)" \
        "$(grep -m1 -o '^Summary after [^,]*' <<< "$journal"), $(grep -m1 -o '^Still lingering at exit: [0-9]*' <<< "$journal")"
    check "journal: no 'Ctrl-C' (-q, not a terminal)" \
        "$(grep -q 'Ctrl-C' <<< "$journal" && echo FAIL || echo pass)" \
        "$(grep -c 'Ctrl-C' <<< "$journal") lines"
    check "recording ends with its summary" \
        "$(recording | tail -1 | grep -q '"type": *"summary"' && echo pass || echo FAIL)" \
        "last record: $(recording | tail -1 | grep -o '"type": *"[a-z_]*"')"

    # 7. Start again: keep-runs moves the first run aside, kept.
    t0=$(date +%s)
    systemctl start "$UNIT"; rc=$?
    wait_for 1800 started_or_failed
    local kept
    kept=$(cd "$STATE" && ls -d run-* 2>/dev/null | tail -1)
    n=$( [ -n "$kept" ] && zcat "$STATE/$kept"/closewait.jsonl.gz* | grep -c '"type": *"linger"')
    check "restart: the previous run kept" \
        "$([ $rc = 0 ] && has_start && [ "${n:-0}" = 5 ] && echo pass || echo FAIL)" \
        "${kept:-no run-* directory} with ${n:-0} linger records; started again after $(since "$t0") s; $(ls "$STATE" | paste -sd' ')"
    local pre held
    pre=$(recording | grep -m1 '"type": *"start"' | grep -o '"pre_existing": *[0-9]*' | grep -o '[0-9]*$')
    held=$(ss -Htn state close-wait "sport = :$SEED_PORT" | wc -l)
    t0=$(date +%s)
    wait_for 600 five_lingering
    n=$(lingering)
    curl -fsS --max-time 10 "http://$METRICS/metrics" > "$DIR/metrics-restart.txt" 2>&1
    check "restart: the sockets lingering since before are seen again" \
        "$([ "$n" = 5 ] && echo pass || echo FAIL)" \
        "closewait_lingering_sockets $n after $(since "$t0") s; $held in CLOSE_WAIT (ss), start record pre_existing ${pre:-?}"

    # 8. systemd-analyze security on the live unit.
    systemd-analyze security --no-pager "$UNIT" > "$DIR/security.txt" 2>&1
    local score
    score=$(grep -o 'Overall exposure level for [^:]*: [0-9.]* [A-Z]*' "$DIR/security.txt")
    fact exposure "$score"
    check "systemd-analyze security $UNIT" "$([ -n "$score" ] && echo pass || echo FAIL)" "${score:-no score}"

    # 9. A configuration error must not loop: without CAP_SYS_ADMIN on a
    # kernel with perf_event_paranoid 3 the tool exits 3; the unit must not
    # restart it (each start would run keep-runs again).
    systemctl stop "$UNIT"
    mkdir -p "/run/systemd/system/$UNIT.service.d"
    printf '[Service]\nCapabilityBoundingSet=~CAP_SYS_ADMIN\n' \
        > "/run/systemd/system/$UNIT.service.d/no-sys-admin.conf"
    systemctl daemon-reload
    t0=$(date +%s)
    systemctl start "$UNIT"
    wait_for 1800 is_failed
    sleep 25                    # RestartSec=10s, twice over
    local restarts
    status=$(systemctl show -P ExecMainStatus "$UNIT")
    restarts=$(systemctl show -P NRestarts "$UNIT")
    check "config error (no CAP_SYS_ADMIN, paranoid $(cat /proc/sys/kernel/perf_event_paranoid)): no restart loop" \
        "$(is_failed && [ "$status" = 3 ] && [ "$restarts" = 0 ] && echo pass || echo FAIL)" \
        "exit status $status, $(systemctl show -P ActiveState $UNIT), $restarts restarts in $(since "$t0") s"
    journalctl -b -u "$UNIT" --no-pager -o short-monotonic > "$DIR/journal.txt"
    n=$(cd "$STATE" && ls -d run-* 2>/dev/null | wc -l)
    check "config error: the incident's run still kept" \
        "$([ -n "$kept" ] && [ -d "$STATE/$kept" ] && echo pass || echo FAIL)" \
        "$(ls "$STATE" | paste -sd' ')"
    rm -rf "/run/systemd/system/$UNIT.service.d"
    systemctl daemon-reload
    systemctl reset-failed "$UNIT"

    # 10. A stop during start-up (bcc still compiling): a clean stop, and
    # whatever it left (nothing, or a recording without a socket in it) is
    # never filed as a run that would push out the incident's.
    local runs_before runs_after
    runs_before=$(cd "$STATE" && ls -d run-* 2>/dev/null | wc -l)
    systemctl start "$UNIT"
    sleep 3
    has_start && echo "started within 3 s: the stop below is not during start-up" >> "$DIR/guest.txt"
    t0=$(date +%s)
    systemctl stop "$UNIT"; rc=$?
    result=$(systemctl show -P Result "$UNIT")
    status="$(systemctl show -P ExecMainCode "$UNIT")/$(systemctl show -P ExecMainStatus "$UNIT")"
    systemctl start "$UNIT"
    runs_after=$(cd "$STATE" && ls -d run-* 2>/dev/null | wc -l)
    check "stop during start-up: a clean stop, no run filed for it" \
        "$([ $rc = 0 ] && [ "$result" = success ] && [ "$runs_after" = "$runs_before" ] \
           && [ -d "$STATE/$kept" ] && echo pass || echo FAIL)" \
        "result $result, code/status $status (1 exited, 2 killed), in $(since "$t0") s; then: $(ls "$STATE" | paste -sd' ')"
    systemctl stop "$UNIT"

    kill -KILL -- "-$server" 2>/dev/null
    tar -C "$STATE" -cf "$DIR/state.tar" . 2>/dev/null    # the recordings, for a look
    echo "done=1" >> "$DIR/guest.txt"
}

# ----------------------------------------------------------------- the host
install_tools() {
    local need=() p
    for p in mmdebstrap qemu-system-x86 qemu-utils e2fsprogs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || need+=("$p")
    done
    [ ${#need[@]} -eq 0 ] && return
    say "installing ${need[*]}"
    flock /tmp/apt.lock env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install failed: ${need[*]}"
}

# The unit that runs the check at boot, and powers the guest off after it.
CHECK_UNIT='[Unit]
Description=closewait-trace check under systemd (scripts/systemd-vm.sh)
After=multi-user.target
RequiresMountsFor=/mnt/shared

[Service]
Type=oneshot
ExecStart=/bin/bash /mnt/shared/systemd-vm.sh --guest /mnt/shared
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target'

build_image() {
    local root="$CACHE/rootfs" include
    include=$(IFS=,; echo "${PACKAGES[*]}")
    rm -rf "$root" "$CACHE/base.ext4" "$CACHE"/vmlinuz* "$CACHE"/initrd.img*
    mkdir -p "$root"
    say "building the Debian 12 image in $root (mmdebstrap, $MIRROR)"
    # Debian 12 as its installer leaves it, plus PACKAGES; the hooks give it
    # an fstab (root on the virtio disk, the shared 9p directory), the check
    # unit, and a root without password for a look on the serial console.
    mmdebstrap --variant=important --include="$include" \
        --customize-hook='echo closewait-vm > "$1/etc/hostname"' \
        --customize-hook='printf "%s\n" "/dev/vda / ext4 rw,errors=remount-ro 0 1" "shared /mnt/shared 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0" > "$1/etc/fstab"' \
        --customize-hook='mkdir -p "$1/mnt/shared"' \
        --customize-hook="printf '%s\n' '$CHECK_UNIT' > \"\$1/etc/systemd/system/closewait-vm-check.service\"" \
        --customize-hook='chroot "$1" systemctl enable closewait-vm-check.service' \
        --customize-hook='chroot "$1" passwd -d root' \
        bookworm "$root" \
        "deb $MIRROR bookworm main" \
        "deb $MIRROR bookworm-updates main" \
        "deb ${MIRROR%/debian}/debian-security bookworm-security main" \
        > "$CACHE/mmdebstrap.log" 2>&1 || { tail -30 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"; }
    cp "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-* "$CACHE/" \
        || die "the image has no kernel or initramfs under /boot"
    truncate -s "$IMAGE_SIZE" "$CACHE/base.ext4.new"
    mkfs.ext4 -q -L closewait-vm -d "$root" "$CACHE/base.ext4.new" \
        || die "mkfs.ext4 -d failed"
    mv "$CACHE/base.ext4.new" "$CACHE/base.ext4"
    rm -rf "$root"
    say "image: $CACHE/base.ext4 ($(du -h "$CACHE/base.ext4" | cut -f1) used)"
}

boot() {
    local shared="$OUT/shared" kernel initrd start
    rm -rf "$OUT" && mkdir -p "$shared" || die "cannot make $OUT"
    bash "$REPO/scripts/build-deb.sh" "$shared" > "$OUT/build-deb.log" 2>&1 \
        || { cat "$OUT/build-deb.log" >&2; die "scripts/build-deb.sh failed"; }
    cp "$REPO/scripts/systemd-vm.sh" "$shared/systemd-vm.sh"
    printf 'commit=%s%s\n' "$(git -C "$REPO" rev-parse --short HEAD)" \
        "$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')" \
        > "$OUT/host.txt"
    kernel=$(ls "$CACHE"/vmlinuz-* | tail -1)
    initrd=$(ls "$CACHE"/initrd.img-* | tail -1)
    # The cached image stays as built: the guest writes to an overlay.
    qemu-img create -q -f qcow2 -b "$CACHE/base.ext4" -F raw "$OUT/disk.qcow2" \
        || die "qemu-img create failed"
    say "booting $(basename "$kernel") under TCG (console: $OUT/console.log)"
    start=$(date +%s)
    timeout "$GUEST_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
        -m "$MEMORY" -smp 2 -no-reboot \
        -display none -monitor none -serial "file:$OUT/console.log" \
        -kernel "$kernel" -initrd "$initrd" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1" \
        -drive "file=$OUT/disk.qcow2,if=virtio,format=qcow2" \
        -virtfs "local,path=$shared,mount_tag=shared,security_model=none,id=shared" \
        -nic none < /dev/null > "$OUT/qemu.log" 2>&1
    printf 'qemu_rc=%s\nwall_s=%s\n' "$?" "$(( $(date +%s) - start ))" >> "$OUT/host.txt"
    rm -f "$OUT/disk.qcow2"
}

field() { sed -n "s/^$2=//p" "$1" 2>/dev/null | tail -1; }

summarize() {
    local g="$OUT/shared/guest.txt" c="$OUT/shared/checks.txt" name result figure failed=0
    if [ ! -s "$c" ]; then
        echo "systemd-vm: the guest wrote no results: see $OUT/console.log" >&2
        return 1
    fi
    while IFS='|' read -r name result figure; do
        printf '%-4s  %s: %s\n' "$result" "$name" "$figure"
        [ "$result" = pass ] || failed=1
    done < "$c"
    [ "$(field "$g" done)" = 1 ] || { echo "FAIL  the guest did not finish (see $OUT/console.log)"; failed=1; }
    echo
    echo "Under a real systemd, $(date -u +%Y-%m-%d), commit $(field "$OUT/host.txt" commit):"
    echo "Debian $(field "$g" debian) image (mmdebstrap), $(field "$g" systemd), kernel"
    echo "$(field "$g" kernel) (perf_event_paranoid $(field "$g" perf_event_paranoid)), python3-bpfcc $(field "$g" bcc),"
    echo "QEMU TCG, $(field "$OUT/host.txt" wall_s) s from boot to power-off (\`scripts/systemd-vm.sh\`)."
    echo
    echo "| check | result | seen |"
    echo "|---|---|---|"
    while IFS='|' read -r name result figure; do
        printf '| %s | %s | %s |\n' "$name" "$result" "$figure"
    done < "$c"
    return $failed
}

main() {
    while [ $# -gt 0 ]; do
        case $1 in
            --guest) guest "$2"; exit $? ;;
            --out) OUT=$2; shift ;;
            --rebuild) REBUILD=1 ;;
            --build-only) REBUILD=1; BUILD_ONLY=1 ;;
            --mirror) MIRROR=$2; shift ;;
            --timeout) GUEST_TIMEOUT=$2; shift ;;
            --memory) MEMORY=$2; shift ;;
            -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
            *) die "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    [[ "$GUEST_TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds, e.g. 5400"
    [[ "$MEMORY" =~ ^[0-9]+$ ]] || die "--memory takes MiB, e.g. 2048"
    [ "$(id -u)" = 0 ] || die "run as root"
    install_tools
    mkdir -p "$CACHE"
    if [ "$REBUILD" = 1 ] || [ ! -s "$CACHE/base.ext4" ]; then
        build_image
    fi
    [ "${BUILD_ONLY:-0}" = 1 ] && exit 0
    boot
    summarize
    exit $?
}

main "$@"
