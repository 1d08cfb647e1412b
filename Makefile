# make && sudo make install     (or: make install PREFIX=/usr DESTDIR=/tmp/stage)
# The work is done by contrib/install.sh, which says what each variable means.
PREFIX ?= /usr/local
export PREFIX DESTDIR BINDIR MANDIR UNITDIR BIN

all:
	cargo build --release

install:
	contrib/install.sh

uninstall:
	contrib/install.sh --uninstall

.PHONY: all install uninstall
