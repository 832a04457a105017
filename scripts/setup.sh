#!/usr/bin/env bash
# Set up closewait-trace on a Debian or Ubuntu machine, then run it or its tests.
# Run it as root (or with sudo):
#
#   scripts/setup.sh trace [OPTIONS]    the runtime only, then tail live (options go to closewait-trace)
#   scripts/setup.sh test [PYTEST ARGS] the runtime and the test tools, then run the test suite
#   scripts/setup.sh service            install the systemd service (packaging/systemd), and start it
#   scripts/setup.sh                    set up for development (as `test`), run nothing
#
# Every action installs the man page (man closewait-trace) and bash completion.
# Idempotent: a second run installs nothing and takes a second or two.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
action=${1:-setup}
[ $# -gt 0 ] && shift

say() { printf 'setup: %s\n' "$*" >&2; }

case "$action" in
    setup|trace|test|service) ;;
    *) echo "setup: unknown action '$action' (use trace, test, service or nothing)" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: needs root (it installs packages and loads BPF): run it as root, or with sudo" >&2
    exit 3
fi

# --- system packages --------------------------------------------------------
. /etc/os-release
arch=$(dpkg --print-architecture)
# The runtime: bcc's binding, and the Python libraries from the distro so that
# pip finds them satisfied (no compiler, debugger or test tool on a production host).
packages=(python3 python3-venv python3-bpfcc python3-click python3-pyelftools
          python3-prometheus-client python3-rich)
if [ "$action" = test ] || [ "$action" = setup ]; then
    # Only the tests need these: the workloads (socat; gcc, libc6-dev and
    # binutils build the C test programs), the processes diagnosed (gdb,
    # strace), bcc's tcpstates for the benchmark's comparison, vagrant to
    # check vagrant/Vagrantfile offline, prometheus and promtool for the
    # metrics and the alert rules, man and systemd-analyze for the man page
    # and the unit, Go for the Go programs whose code locations are checked,
    # CPython's internal headers to check the frame layouts against (offsetof),
    # mmdebstrap for the chroots running CPython 3.12 and 3.13 (scripts/pychroots.sh),
    # a JSON Schema validator to check docs/closewait-trace.schema.json with.
    packages+=(socat iproute2 procps gcc libc6-dev binutils strace gdb bpfcc-tools vagrant
               prometheus man-db systemd golang-go libpython3-dev python3-jsonschema
               mmdebstrap)
    # The .deb's build (scripts/build-deb.sh), which a kernel test installs.
    packages+=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
               python3-hatchling)
fi

if [ ! -e "/lib/modules/$(uname -r)/build/include" ]; then
    # The running kernel's own headers when the distro has them; otherwise the
    # generic ones (see docs/kernel-headers.md).
    if apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        packages+=("linux-headers-$(uname -r)")
    elif [ "${ID:-}" = ubuntu ] || [[ " ${ID_LIKE:-} " == *" ubuntu "* ]]; then
        packages+=(linux-headers-generic)
    else
        packages+=("linux-headers-$arch")
    fi
fi

if [ "$action" = trace ] || [ "$action" = service ]; then extras=""; else extras="[test]"; fi
if [ -n "${SETUP_PLAN_ONLY:-}" ]; then
    # What this action would install, for the tests; installs nothing.
    echo "packages: ${packages[*]}"
    echo "python: closewait-trace$extras"
    exit 0
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt (unattended upgrades) instead of failing.
    apt=(apt-get -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update -qq
    # A kernel-specific headers package may not exist for this kernel: retry with the generic one.
    if ! "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        say "retrying with generic kernel headers"
        fallback=()
        for p in "${missing[@]}"; do
            case "$p" in linux-headers-*) fallback+=("linux-headers-$arch") ;; *) fallback+=("$p") ;; esac
        done
        "${apt[@]}" install -y -qq --no-install-recommends "${fallback[@]}" >/dev/null
    fi
fi

# --- tracefs: bcc finds tracepoints there -----------------------------------
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs"
fi

# --- the package ----------------------------------------------------------------
# bcc's binding lives in the distro's Python only: a venv is made on
# /usr/bin/python3 and sees its site-packages.
make_venv() {   # DIR
    if [ ! -x "$1/bin/python" ] || ! "$1/bin/python" -c 'import bcc' 2>/dev/null; then
        say "creating $1 on /usr/bin/python3"
        rm -rf "$1"
        /usr/bin/python3 -m venv --system-site-packages "$1"
    fi
}

if [ "$action" = service ]; then
    # A copy of its own under /opt (not the checkout: the unit's ProtectHome
    # hides /root and /home), installed like a wheel, without test extras.
    prefix=/opt/closewait-trace
    make_venv "$prefix"
    say "installing closewait-trace into $prefix"
    "$prefix/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$here"
    "$prefix/bin/pip" install -q --disable-pip-version-check "$here"   # dependencies, if any missing
    tool="$prefix/bin/closewait-trace"
else
    make_venv "$venv"
    stamp="$venv/.installed-$(cat "$here/pyproject.toml" - <<<"$extras" | sha256sum | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        say "installing closewait-trace${extras} into $venv"
        "$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extras"
        rm -f "$venv"/.installed-*
        touch "$stamp"
    fi
    tool="$venv/bin/closewait-trace"
fi

# --- man page, command, completion ----------------------------------------------
install_if_changed() {   # MODE SRC DEST
    if ! cmp -s "$2" "$3" 2>/dev/null; then
        install -D -m "$1" "$2" "$3"
        return 0
    fi
    return 1
}
if install_if_changed 0644 "$here/packaging/man/man8/closewait-trace.8" \
        /usr/local/share/man/man8/closewait-trace.8; then
    command -v mandb >/dev/null && mandb -q 2>/dev/null || true
fi
# `closewait-trace` on root's PATH (completion runs it by that name): a link
# to the install that `trace` or `service` made (a development set-up makes
# none; a file there that is not a link is left alone).
link=/usr/local/sbin/closewait-trace
previous=$(readlink "$link" 2>/dev/null || true)
if [ "$action" = trace ] || [ "$action" = service ]; then
    if [ ! -e "$link" ] || [ -L "$link" ]; then
        if [ "$(readlink "$link" 2>/dev/null)" != "$tool" ]; then
            # Said: it changes a machine-wide command (to this clone's venv).
            say "linking $link -> $tool${previous:+ (was $previous)}"
        fi
        ln -sfn "$tool" "$link"
    else
        say "$link exists and is not a link: left alone"
    fi
fi
completion=$(mktemp)
_CLOSEWAIT_TRACE_COMPLETE=bash_source "$tool" >"$completion"
install_if_changed 0644 "$completion" \
    /usr/local/share/bash-completion/completions/closewait-trace || true
rm -f "$completion"

# --- the service -------------------------------------------------------------
if [ "$action" = service ]; then
    install -D -m 0755 "$here/packaging/systemd/keep-runs" /usr/local/lib/closewait-trace/keep-runs
    install -D -m 0644 "$here/packaging/systemd/closewait-trace.service" \
        /etc/systemd/system/closewait-trace.service
    install -D -m 0644 "$here/packaging/prometheus/closewait-trace.rules.yml" \
        /usr/local/share/closewait-trace/closewait-trace.rules.yml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable closewait-trace.service
        systemctl restart closewait-trace.service
        say "running: systemctl status closewait-trace; metrics on http://127.0.0.1:9477/metrics"
    else
        say "installed /etc/systemd/system/closewait-trace.service; systemd is not running" \
            "here, start it where it is: systemctl enable --now closewait-trace"
    fi
fi

# --- CPython 3.12 and 3.13 for the tests: chroots (kept once built) ------------
if [ "$action" = test ] || [ "$action" = setup ]; then
    "$here/scripts/pychroots.sh"
fi

case "$action" in
    setup) say "ready: $tool" ;;
    trace) exec "$tool" "$@" ;;
    test)  cd "$here" && exec "$venv/bin/python" -m pytest "$@" ;;
    service) ;;
esac
