#!/usr/bin/env bash
# Install forecaster as a systemd service: the one server recipe (README "systemd" and
# systemd/README.md point here). Run from a clone, as root, on Debian/Ubuntu with python3-venv:
#
#   sudo scripts/install-server.sh              # the package from this clone
#   sudo scripts/install-server.sh dist/forecaster-0.1.0-py3-none-any.whl
#
# What it does (each step is idempotent; an existing /etc/forecaster/forecaster.toml is kept):
#   1. a venv in /opt/forecaster with the serving install (no PyTorch)
#   2. /usr/local/bin/forecaster -> /opt/forecaster/bin/forecaster (the unit's ExecStart)
#   3. the bundled models, world-readable (the service runs as a dynamic user), in
#      /usr/share/forecaster/models (copied from the installed package's share/forecaster)
#   4. the unit in /etc/systemd/system, the example config in /etc/forecaster, and an empty
#      0600 /etc/forecaster/mqtt-password when there is none (LoadCredential= needs the file;
#      write the broker password into it if the broker wants one)
#   5. systemctl daemon-reload and enable --now (skipped with DESTDIR or without systemd)
#
# DESTDIR=/some/dir installs into that folder as if it were / (the venv then lives and works
# under it) and starts nothing: tests/test_install.py runs these very steps that way.
set -euo pipefail
CLONE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$CLONE}
D=${DESTDIR:-}
PREFIX=/opt/forecaster
PYTHON=${PYTHON:-python3}

say() { echo "install-server: $*" >&2; }

say "1. venv $D$PREFIX with $SRC"
"$PYTHON" -m venv "$D$PREFIX"
"$D$PREFIX/bin/python" -m pip install --quiet --upgrade pip
"$D$PREFIX/bin/python" -m pip install --quiet "$SRC"

say "2. $D/usr/local/bin/forecaster"
install -d -m 0755 "$D/usr/local/bin"
ln -sfn "../../..$PREFIX/bin/forecaster" "$D/usr/local/bin/forecaster"  # relative: works under DESTDIR

say "3. bundles in $D/usr/share/forecaster/models"
install -d -m 0755 "$D/usr/share/forecaster/models"
cp -r "$D$PREFIX/share/forecaster/models/." "$D/usr/share/forecaster/models/"
chmod -R a+rX "$D/usr/share/forecaster"

say "4. unit, config and credential file"
install -d -m 0755 "$D/etc/systemd/system" "$D/etc/forecaster"
install -m 0644 "$CLONE/systemd/forecaster.service" "$D/etc/systemd/system/forecaster.service"
if [ ! -e "$D/etc/forecaster/forecaster.toml" ]; then
  install -m 0644 "$CLONE/deploy/forecaster.toml" "$D/etc/forecaster/forecaster.toml"
fi
if [ ! -e "$D/etc/forecaster/mqtt-password" ]; then
  install -m 0600 /dev/null "$D/etc/forecaster/mqtt-password"
fi
"$D/usr/local/bin/forecaster" check-config "$D/etc/forecaster/forecaster.toml" --no-bundles >/dev/null

if [ -n "$D" ] || ! [ -d /run/systemd/system ]; then
  say "5. not starting anything (DESTDIR set or no systemd): systemctl enable --now forecaster"
  exit 0
fi
say "5. systemctl enable --now forecaster"
systemctl daemon-reload
systemctl enable --now forecaster
systemctl --no-pager --lines=5 status forecaster || true
