#!/usr/bin/env bash
# Idempotent set-up of a Debian/Ubuntu machine for Embervm:
#  1. installs the Debian packages that are missing (needs root or sudo);
#  2. creates .venv and installs the project editable with its dev extra.
# Running it again does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# package:command-or-path that proves it is installed
REQUIRED=(
  "qemu-system-x86:qemu-system-x86_64"
  "qemu-utils:qemu-img"
  "e2fsprogs:mkfs.ext4"
  "mmdebstrap:mmdebstrap"
  "nftables:nft"
  "iproute2:ip"
  "dnsmasq-base:dnsmasq"
  "busybox-static:/bin/busybox"
  "kmod:depmod"
  "cpio:cpio"
  "xz-utils:xz"
  "zstd:zstd"
  "openssl:openssl"
  "curl:curl"
  "ca-certificates:/etc/ssl/certs/ca-certificates.crt"
  "python3-venv:python-venv"
  "postgresql:/usr/lib/postgresql"
  "nginx-light:nginx"
  "wrk:wrk"
  "nghttp2-client:h2load"
)

have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
  esac
}

missing=()
for entry in "${REQUIRED[@]}"; do
  pkg=${entry%%:*}; probe=${entry#*:}
  if [ "$probe" = python-venv ]; then
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=("$pkg")
    continue
  fi
  have "$probe" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv is rebuilt only when pyproject.toml changes (a stamp holds its hash).
stamp=.venv/.embervm-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
echo "setup: ok"
