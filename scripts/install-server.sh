#!/usr/bin/env bash
# Install forecaster as a systemd service: the one server recipe (README "systemd" and
# systemd/README.md point here). Run from a clone, as root, on Debian/Ubuntu with python3-venv:
#
#   sudo scripts/install-server.sh              # the package from this clone
#   sudo scripts/install-server.sh dist/forecaster-0.1.0-py3-none-any.whl
#   sudo WORKERS=2 scripts/install-server.sh   # two NATS workers (docs/scale-out.md)
#
# What it does (each step is idempotent; an existing /etc/forecaster/forecaster.toml is kept):
#   1. a venv in /opt/forecaster with the serving install (no PyTorch), plus the optional
#      extras named in EXTRAS (comma-separated; "nats" by default with WORKERS)
#   2. /usr/local/bin/forecaster -> /opt/forecaster/bin/forecaster (the unit's ExecStart)
#   3. the bundled models, world-readable (the service runs as a dynamic user), in
#      /usr/share/forecaster/models (copied from the installed package's share/forecaster)
#   4. the units in /etc/systemd/system (forecaster.service for one process, the template
#      forecaster@.service for NATS workers), the example config in /etc/forecaster (with
#      WORKERS, the fleet example deploy/nats/forecaster-fleet.toml), and an empty 0600 /etc/forecaster/mqtt-password when there is none (LoadCredential= needs the file;
#      write the broker password into it if the broker wants one)
#   5. systemctl daemon-reload and enable --now forecaster, or, with WORKERS=N, the NATS workers
#      forecaster@0 .. forecaster@N-1 (skipped with DESTDIR, without systemd, and when the fleet
#      example was just installed: its servers must be edited first)
#
# DESTDIR=/some/dir installs into that folder as if it were / (the venv then lives and works
# under it) and starts nothing: tests/test_install.py runs these very steps that way.
set -euo pipefail
CLONE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$CLONE}
D=${DESTDIR:-}
PREFIX=/opt/forecaster
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
WORKERS=${WORKERS:-}
UNITS=forecaster
if [ -n "$WORKERS" ]; then
  case $WORKERS in
    '' | *[!0-9]* | 0) echo "install-server: WORKERS must be a positive number, got '$WORKERS'" >&2; exit 2 ;;
  esac
  UNITS=$(seq -f 'forecaster@%g' 0 $((WORKERS - 1)) | tr '\n' ' ')
  EXTRAS=${EXTRAS:-nats}  # the workers need the NATS client
fi

say() { echo "install-server: $*" >&2; }

PACKAGE=$SRC
if [ -n "$EXTRAS" ]; then
  PACKAGE="$SRC[$EXTRAS]"
fi
say "1. venv $D$PREFIX with $PACKAGE"
"$PYTHON" -m venv "$D$PREFIX"
"$D$PREFIX/bin/python" -m pip install --quiet --upgrade pip
"$D$PREFIX/bin/python" -m pip install --quiet "$PACKAGE"

say "2. $D/usr/local/bin/forecaster"
install -d -m 0755 "$D/usr/local/bin"
ln -sfn "../../..$PREFIX/bin/forecaster" "$D/usr/local/bin/forecaster"  # relative: works under DESTDIR

say "3. bundles in $D/usr/share/forecaster/models"
install -d -m 0755 "$D/usr/share/forecaster/models"
cp -r "$D$PREFIX/share/forecaster/models/." "$D/usr/share/forecaster/models/"
chmod -R a+rX "$D/usr/share/forecaster"

say "4. units, config and credential file"
install -d -m 0755 "$D/etc/systemd/system" "$D/etc/forecaster"
install -m 0644 "$CLONE/systemd/forecaster.service" "$D/etc/systemd/system/forecaster.service"
install -m 0644 "$CLONE/systemd/forecaster@.service" "$D/etc/systemd/system/forecaster@.service"
EXAMPLE=$CLONE/deploy/forecaster.toml
if [ -n "$WORKERS" ]; then
  EXAMPLE=$CLONE/deploy/nats/forecaster-fleet.toml  # edit its servers before the workers start
fi
FRESH=
if [ ! -e "$D/etc/forecaster/forecaster.toml" ]; then
  install -m 0644 "$EXAMPLE" "$D/etc/forecaster/forecaster.toml"
  FRESH=1
fi
if [ ! -e "$D/etc/forecaster/mqtt-password" ]; then
  install -m 0600 /dev/null "$D/etc/forecaster/mqtt-password"
fi
"$D/usr/local/bin/forecaster" check-config "$D/etc/forecaster/forecaster.toml" --no-bundles >/dev/null

if [ -n "$D" ] || ! [ -d /run/systemd/system ]; then
  say "5. not starting anything (DESTDIR set or no systemd): systemctl enable --now $UNITS"
  exit 0
fi
if [ -n "$WORKERS" ] && [ -n "$FRESH" ]; then
  say "5. not starting anything: put your NATS servers in /etc/forecaster/forecaster.toml, then"
  say "   systemctl daemon-reload && systemctl enable --now $UNITS"
  exit 0
fi
say "5. systemctl enable --now $UNITS"
systemctl daemon-reload
# shellcheck disable=SC2086  # one word per unit
systemctl enable --now $UNITS
# shellcheck disable=SC2086
systemctl --no-pager --lines=5 status $UNITS || true
