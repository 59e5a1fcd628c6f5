# Shared helpers for scripts/install, scripts/test and scripts/bench (sourced).
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SESSIOND_CACHE:-/var/cache/sessiond}

# Debian packages the daemon, the rootfs builder and the tests need.
# shellcheck disable=SC2034 # used by the scripts that source this file
apt_packages=(debootstrap gcc pkg-config python3 python3-venv nftables iproute2 curl ca-certificates)

say() { printf '[%s] %s\n' "${script_name:-sessiond}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (sandboxes need namespaces, cgroups and pivot_root)"
}

need_debian() {
    if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
        die "this script supports Debian (12 bookworm) and derivatives with apt-get"
    fi
}

# Cargo from rustup lives in ~/.cargo/bin, which non-login shells (CI) may lack.
need_cargo() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        say "cargo is missing: sessiond is built from source with a Rust toolchain (1.85 or newer)."
        say "install one with rustup, then run this script again:"
        say "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt"
        say "    . \"\$HOME/.cargo/env\""
        exit 1
    fi
}

# Installs only what is missing, so a second run does not touch apt.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || say "apt-get update failed; trying with the current package lists"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The python3 on PATH (pyenv or /usr/bin), and whether it can make venvs.
pick_python() {
    python=$(command -v python3 || true)
    [ -n "$python" ] || die "python3 is missing (apt-get install python3 python3-venv)"
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian's python3 needs python3-venv for ensurepip; other pythons
        # (pyenv) carry it. Fall back to Debian's interpreter if needed.
        apt_install python3-venv
        "$python" -c 'import ensurepip, venv' 2>/dev/null || python=/usr/bin/python3
    fi
}

# Where the test venv for the current requirements and interpreter lives.
testenv_path() {
    local key
    key=$( (cat "$repo/tests/requirements.txt"; "$python" -c 'import sys; print(sys.version, sys.executable)') |
        sha256sum | cut -c1-16)
    echo "$cache/testenv-$key"
}

# Creates the test venv if missing (run it in a subshell: it takes a lock on
# fd 9). Half-made venvs from an interrupted run have no .complete marker
# and are made again.
make_testenv() {
    local dest=$1
    mkdir -p "$cache"
    exec 9>"$cache/.testenv.lock"
    flock 9
    [ -f "$dest/.complete" ] && return 0
    rm -rf "$dest"
    "$python" -m venv "$dest"
    "$dest/bin/pip" install --quiet --disable-pip-version-check -r "$repo/tests/requirements.txt"
    touch "$dest/.complete"
}
