#!/usr/bin/env bash
# Installs the dashboard's charting library (uPlot, from npm, pinned) where `bios serve`
# serves it: src/bios/server/console/vendor/ (not in git). Idempotent: does nothing when the
# pinned version is already there. Needs npm (or an already-downloaded tarball in $UPLOT_TGZ).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.6.32
DEST=src/bios/server/console/vendor
STAMP="$DEST/.uplot-$VERSION"
[ -f "$STAMP" ] && [ -f "$DEST/uPlot.iife.min.js" ] && [ -f "$DEST/uPlot.min.css" ] && exit 0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${UPLOT_TGZ:-}" ]; then
  cp "$UPLOT_TGZ" "$tmp/uplot.tgz"
else
  command -v npm >/dev/null 2>&1 || {
    echo "setup_console_assets: npm is needed to fetch uplot@$VERSION (apt-get install npm)" >&2
    exit 1; }
  # npm checks the tarball against the registry's integrity hash.
  (cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null && mv uplot-"$VERSION".tgz uplot.tgz)
fi
tar -xzf "$tmp/uplot.tgz" -C "$tmp" package/dist/uPlot.iife.min.js package/dist/uPlot.min.css \
  package/LICENSE
mkdir -p "$DEST"
rm -f "$DEST"/.uplot-*
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$DEST/"
cp "$tmp/package/LICENSE" "$DEST/LICENSE.uPlot"
touch "$STAMP"
echo "setup_console_assets: uPlot $VERSION installed in $DEST"
