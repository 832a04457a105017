#!/usr/bin/env bash
# Set up closewait-trace on a Debian or Ubuntu machine, then run it or its tests.
#
#   sudo scripts/setup.sh trace [OPTIONS]   set up, then tail live (options go to closewait-trace)
#   sudo scripts/setup.sh test [PYTEST ARGS] set up, then run the whole test suite
#   sudo scripts/setup.sh                   set up only
#
# Idempotent: a second run installs nothing and takes a second or two.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
action=${1:-setup}
[ $# -gt 0 ] && shift

say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: needs root (it installs packages and loads BPF): run it with sudo" >&2
    exit 3
fi

# --- system packages --------------------------------------------------------
. /etc/os-release
arch=$(dpkg --print-architecture)
packages=(python3 python3-venv python3-bpfcc socat iproute2 procps gcc libc6-dev binutils strace gdb)
if [ "$action" = test ]; then
    # Only the tests need these: bcc's tcpstates for the benchmark's
    # comparison, and vagrant to check vagrant/Vagrantfile offline.
    packages+=(bpfcc-tools vagrant)
fi

if [ ! -e "/lib/modules/$(uname -r)/build/include" ]; then
    # The running kernel's own headers when the distro has them; otherwise the
    # generic ones (see README: "Kernel headers").
    if apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        packages+=("linux-headers-$(uname -r)")
    elif [ "${ID:-}" = ubuntu ] || [[ " ${ID_LIKE:-} " == *" ubuntu "* ]]; then
        packages+=(linux-headers-generic)
    else
        packages+=("linux-headers-$arch")
    fi
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # A kernel-specific headers package may not exist for this kernel: retry with the generic one.
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        say "retrying with generic kernel headers"
        fallback=()
        for p in "${missing[@]}"; do
            case "$p" in linux-headers-*) fallback+=("linux-headers-$arch") ;; *) fallback+=("$p") ;; esac
        done
        apt-get install -y -qq --no-install-recommends "${fallback[@]}" >/dev/null
    fi
fi

# --- tracefs: bcc finds tracepoints there -----------------------------------
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs"
fi

# --- the virtual environment --------------------------------------------------
# bcc's binding lives in the distro's Python only: the venv is made on
# /usr/bin/python3 and sees its site-packages.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
    say "creating $venv on /usr/bin/python3"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.installed-$(sha256sum "$here/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    say "installing closewait-trace into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

case "$action" in
    setup) say "ready: $venv/bin/closewait-trace" ;;
    trace) exec "$venv/bin/closewait-trace" "$@" ;;
    test)  cd "$here" && exec "$venv/bin/python" -m pytest "$@" ;;
    *) echo "setup: unknown action '$action' (use trace, test or nothing)" >&2; exit 2 ;;
esac
