#!/bin/sh
# Install flexnbd: the binary, the man page and the systemd units.
#
#   cargo build --release && sudo contrib/install.sh
#   contrib/install.sh --uninstall
#
# Environment (the usual names):
#   PREFIX   where things go (default /usr/local): bin/, share/man/man1/, lib/systemd/system/
#   DESTDIR  staging root prepended to every path (packaging), default empty
#   BINDIR, MANDIR, UNITDIR   override the single directories
#   BIN      the binary to install (default target/release/flexnbd)
# The units' ExecStart= is rewritten to the installed binary's path.
set -eu

cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
MANDIR=${MANDIR:-$PREFIX/share/man}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
DESTDIR=${DESTDIR:-}
BIN=${BIN:-target/release/flexnbd}
UNITS="flexnbd@.service flexnbd@.socket"

if [ "${1:-}" = "--uninstall" ]; then
    rm -f "$DESTDIR$BINDIR/flexnbd" "$DESTDIR$MANDIR/man1/flexnbd.1"
    for u in $UNITS; do
        rm -f "$DESTDIR$UNITDIR/$u"
    done
    echo "removed flexnbd from $DESTDIR$PREFIX"
    exit 0
elif [ $# -gt 0 ]; then
    echo "usage: [PREFIX=...] [DESTDIR=...] $0 [--uninstall]" >&2
    exit 2
fi

if [ ! -x "$BIN" ]; then
    echo "install.sh: $BIN not found: run 'cargo build --release' first (or set BIN)" >&2
    exit 1
fi

install -d "$DESTDIR$BINDIR" "$DESTDIR$MANDIR/man1" "$DESTDIR$UNITDIR"
install -m 0755 "$BIN" "$DESTDIR$BINDIR/flexnbd"
install -m 0644 man/flexnbd.1 "$DESTDIR$MANDIR/man1/flexnbd.1"
for u in $UNITS; do
    sed "s|/usr/bin/flexnbd|$BINDIR/flexnbd|g" "contrib/systemd/$u" >"$DESTDIR$UNITDIR/$u.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/$u.tmp"
    mv "$DESTDIR$UNITDIR/$u.tmp" "$DESTDIR$UNITDIR/$u"
done
echo "installed flexnbd $("$DESTDIR$BINDIR/flexnbd" --version | cut -d' ' -f2) into $DESTDIR$PREFIX"
