#!/usr/bin/env bash
# The CPython interpreters the tests run besides Debian 12's 3.11, each in a
# chroot built with mmdebstrap from its distribution's own archive (tests
# find them through tests/pychroots.py):
#   3.13: Debian 13 (trixie), python3.13 and libpython3.13-dev (its headers:
#         the tests check the layout read from a process against them);
#   3.12: Ubuntu 24.04 (noble), python3.12 and libpython3.12-dev, signed by
#         Ubuntu's archive key, which Debian 13's ubuntu-keyring package
#         carries (installed in the trixie chroot for that).
# Measured on the development machine (2 cores, deb.debian.org and
# archive.ubuntu.com): trixie 17 s and 222 MB, noble 10 s and 194 MB.
# A chroot already built with the same packages is kept (a second run takes
# no time); one half-built (a run killed mid-way) is unmounted and removed
# first. Run as root: scripts/pychroots.sh [DIR] (default /var/cache/closewait-trace).
set -euo pipefail

root=${1:-${CW_PYCHROOTS:-/var/cache/closewait-trace}}
say() { printf 'pychroots: %s\n' "$*" >&2; }
mkdir -p "$root"

discard() {   # DIR: a chroot half made; mmdebstrap killed mid-way leaves mounts in it
    local dir=$1 m
    [ -e "$dir" ] || return 0
    # Deepest first.
    for m in $(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
        umount -l "$m" || true
    done
    # A killed mmdebstrap's dpkg may still be writing in it for a moment.
    for _ in 1 2 3 4 5; do
        rm -rf --one-file-system "$dir" 2>/dev/null && return 0
        sleep 2
    done
    rm -rf --one-file-system "$dir"
}

build() {   # NAME SUITE MIRROR PYTHON "PACKAGES" [MMDEBSTRAP OPTIONS...]
    local name=$1 suite=$2 mirror=$3 python=$4 packages=$5
    shift 5
    local dir="$root/$name" spec="$suite $mirror $packages $*"
    if [ -x "$dir/usr/bin/$python" ] && [ "$(cat "$dir/.closewait-trace-spec" 2>/dev/null)" = "$spec" ]; then
        return 0
    fi
    discard "$dir.tmp"
    local started=$SECONDS
    say "building $dir ($suite: ${packages//,/ })"
    mmdebstrap --quiet --variant=apt --include="$packages" "$@" "$suite" "$dir.tmp" "$mirror"
    chroot "$dir.tmp" "$python" -c 'pass'
    printf '%s' "$spec" >"$dir.tmp/.closewait-trace-spec"
    discard "$dir"
    mv "$dir.tmp" "$dir"
    say "built $dir in $((SECONDS - started)) s, $(du -sh --one-file-system "$dir" | cut -f1)"
}

build py313-trixie trixie http://deb.debian.org/debian python3.13 \
    python3.13,libpython3.13-dev,ubuntu-keyring
build py312-noble noble http://archive.ubuntu.com/ubuntu python3.12 \
    python3.12,libpython3.12-dev --components=main \
    --keyring="$root/py313-trixie/usr/share/keyrings/ubuntu-archive-keyring.gpg"
