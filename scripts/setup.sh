#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a virtualenv at .venv, Braid installed
# in it (editable). Safe to run again; does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages: etcd (server + etcdctl) for the control plane; libvirt +
# QEMU for VMs (libvirt-dev + pkg-config to build libvirt-python); Debian's
# cloud kernel is fetched by `braid dev guest` (busybox-static, cpio for its
# initramfs); iproute2 and procps for the tests; fio (with its nbd engine),
# libnbd-bin (nbdinfo, nbdcopy) and qemu-utils (qemu-img, qemu-nbd) are the
# real NBD clients of the storage tests and benchmarks; nftables is the net
# daemon's firewall, iperf3 measures the overlay (bench), util-linux has nsenter;
# libfuse2 runs the FUSE fault-injection filesystem of the disk fault tests.
APT_PACKAGES=(etcd-server etcd-client libvirt-daemon-system libvirt-daemon-driver-qemu
              libvirt-clients libvirt-dev pkg-config gcc qemu-system-x86 qemu-utils
              busybox-static cpio iproute2 procps fio libnbd-bin nftables iperf3 util-linux
              libfuse2)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # the package's postinst would start a system etcd on :2379; we run our own
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is required ($("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.braid-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "setup: installing Braid and its dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$stamp"
fi
