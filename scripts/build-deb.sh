#!/usr/bin/env bash
# Build closewait-trace's .deb with Debian's own tooling (debian/, pybuild),
# from this checkout, in a temporary copy (the checkout stays clean).
#
#   scripts/build-deb.sh [OUTDIR]     the .deb goes to OUTDIR (default: ./dist)
#
# Installs the build dependencies with apt-get if they are missing (as root).
# Then, on any Debian 12 or Ubuntu host: apt install ./closewait-trace_*.deb
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$here/dist}" && cd "${1:-$here/dist}" && pwd)
say() { printf 'build-deb: %s\n' "$*" >&2; }

deps=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling
      python3-click)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-deb: missing ${missing[*]}: install them, or run this as root" >&2
        exit 3
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/closewait-trace"
# The tracked files as they are now (uncommitted changes included), nothing else.
(cd "$here" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$here" && xargs -0 cp --parents -t "$work/closewait-trace" 2>/dev/null || true)
# The distro's Python and tools, whatever else is first on PATH (pyenv...).
(cd "$work/closewait-trace" && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
cp "$work"/closewait-trace_*_all.deb "$out/"
say "built $(ls "$out"/closewait-trace_*_all.deb | tail -1)"
