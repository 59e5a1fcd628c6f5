#!/usr/bin/env bash
# Configures a freshly debootstrapped rootfs (argument: its directory) for
# sessions: trims caches, creates the mount points the sandbox uses and sets
# matplotlib's non-interactive backend.
set -euo pipefail
root=$1
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
mkdir -p "$root/mnt/data" "$root/run/sessiond" "$root/usr/lib/sessiond"
chmod 1777 "$root/tmp"
# Sandboxes have no display: render figures to PNG.
mkdir -p "$root/etc/matplotlib"
echo 'backend: Agg' > "$root/etc/matplotlib/matplotlibrc"
# Pre-compile matplotlib's font cache so the first plot in a session is fast.
chroot "$root" /usr/bin/env MPLCONFIGDIR=/usr/lib/sessiond/mpl /usr/bin/python3 -c \
    'import matplotlib.font_manager' >/dev/null 2>&1 || true
chmod -R a+rX "$root/usr/lib/sessiond"
# Sessions use this directory as MPLCONFIGDIR: sticky and world-writable so
# matplotlib accepts it (each sandbox writes into its own overlay copy).
chmod 1777 "$root/usr/lib/sessiond/mpl"
echo sandbox > "$root/etc/hostname"
