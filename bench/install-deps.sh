#!/usr/bin/env bash
# Install the tools bench/run.sh needs (Debian/Ubuntu, as root): nbdkit (file plugin),
# qemu-nbd + qemu-img, nbdcopy + nbdinfo, fio (with its nbd ioengine).
set -euo pipefail
pkgs=()
command -v nbdkit   >/dev/null || pkgs+=(nbdkit)
command -v qemu-nbd >/dev/null || pkgs+=(qemu-utils)
command -v qemu-img >/dev/null || pkgs+=(qemu-utils)
command -v nbdcopy  >/dev/null || pkgs+=(libnbd-bin)
command -v nbdinfo  >/dev/null || pkgs+=(libnbd-bin)
command -v fio      >/dev/null || pkgs+=(fio)
command -v strip    >/dev/null || pkgs+=(binutils)
if ((${#pkgs[@]} == 0)); then
    echo "install-deps: all tools present"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "install-deps: need root to install: ${pkgs[*]}" >&2
    exit 1
fi
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
