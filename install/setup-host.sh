#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 host for mmshim development, CI and the demo.
#
# Debian-specific steps (apt, building CRIU from Debian's source) are kept apart from the
# host-agnostic ones (the venv, the mmshim executables) so a later AMI installer can reuse the latter.
# A second run on a set-up host only checks, and takes seconds.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${MMSHIM_PREFIX:-/opt/mmshim}
VENV=$PREFIX/venv
CRIU_VERSION=4.1.1
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
CRIU_SRC=$PREFIX/src/criu-$CRIU_VERSION
# Image streaming for runc's RPC restores; dumps of network sockets on Linux 6.16+ (see each file).
CRIU_PATCHES=("$REPO/install/criu-rpc-stream.patch" "$REPO/install/criu-sockopts-6.16.patch")
# criu --version's GitID: mmshim streams restores with the patched build; the suffix names the build
CRIU_MARK=v$CRIU_VERSION+mmshim-rpc-stream+kdat-rundir+sockopts
# CRIU probes the kernel for ~30 ms at every start (inside the container's pause at a checkpoint,
# before the job runs at a restore) unless it finds its cache there; it keeps the cache only on a
# tmpfs, which a reboot (a new kernel) clears. Its default, /run, is not a tmpfs on every host.
CRIU_RUNDIR=/run/mmshim/criu

log() { printf '[setup-host] %s\n' "$*" >&2; }
die() { printf '[setup-host] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and writes $PREFIX)"

# ---------------------------------------------------------------- Debian packages
APT_PKGS=(runc iptables docker.io containerd busybox-static python3-venv python3-dev gcc libc6-dev make
  git ca-certificates curl xz-utils patch xfsprogs
  libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev
  pkgconf protobuf-c-compiler protobuf-compiler python3-protobuf uuid-dev libnftables-dev libaio-dev)

debian_packages() {
  local missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  # No init system here: keep package scripts from starting dockerd/containerd themselves.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

# Debian 12's criu 3.17 fails on current kernels (vDSO layout); build 4.1.1 from Debian 13's source.
criu_source() {
  [ -f "$CRIU_SRC/Makefile" ] || criu_extract
  local p
  for p in "${CRIU_PATCHES[@]}"; do  # each once: a patch that reverses cleanly is in already
    patch -d "$CRIU_SRC" -p1 -R --dry-run -s -f <"$p" >/dev/null 2>&1 ||
      patch -d "$CRIU_SRC" -p1 --forward -s <"$p" || die "cannot apply $p"
  done
}

criu_extract() {
  local src=/etc/apt/sources.list.d/mmshim-trixie-src.sources
  if [ ! -f "$src" ]; then
    cat >"$src" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
  fi
  mkdir -p "$PREFIX/src"
  local tarball=$PREFIX/src/criu_$CRIU_VERSION.orig.tar.xz
  if [ ! -f "$tarball" ]; then
    log "downloading CRIU $CRIU_VERSION source"
    # The .dsc/.debian.tar.xz answer 404 on the mirror; the orig tarball is all we need.
    (cd "$PREFIX/src" && apt-get source --download-only "criu=$CRIU_VERSION-1" >/dev/null 2>&1 || true)
    [ -f "$tarball" ] || die "could not download criu_$CRIU_VERSION.orig.tar.xz from Debian's trixie sources"
  fi
  echo "$CRIU_SHA256  $tarball" | sha256sum -c --quiet - || die "CRIU tarball checksum mismatch: $tarball"
  tar -C "$PREFIX/src" -xf "$tarball"
  [ -f "$CRIU_SRC/Makefile" ] || die "unexpected CRIU tarball layout"
}

criu_build() {
  if [ -x /usr/local/sbin/criu ] && /usr/local/sbin/criu --version 2>/dev/null | grep -qF "GitID: $CRIU_MARK"; then
    return 0
  fi
  criu_source
  log "building CRIU $CRIU_VERSION with ${CRIU_PATCHES[*]##*/} (about a minute)"
  rm -f "$CRIU_SRC/criu/kerndat.o"  # make does not see a new RUNDIR, which only this object uses
  make -C "$CRIU_SRC" -j"$(nproc)" criu GITID="$CRIU_MARK" RUNDIR="$CRIU_RUNDIR" >"$PREFIX/src/criu-build.log" 2>&1 || die "CRIU build failed: see $PREFIX/src/criu-build.log"
  install -m 0755 "$CRIU_SRC/criu/criu" /usr/local/sbin/criu
}

# ---------------------------------------------------------------- host-agnostic steps
criu_rundir() {
  # A tmpfs at CRIU's run dir: the one /run is on systemd hosts (ECS-optimized AMIs; tmpfiles.d
  # makes the dir again at boot), a small one of its own elsewhere (this Debian VM: /run is ext4).
  mkdir -p -m 0700 "$CRIU_RUNDIR"
  [ -d /etc/tmpfiles.d ] && echo "d $CRIU_RUNDIR 0700 root root -" >/etc/tmpfiles.d/mmshim-criu.conf
  if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
    mount -t tmpfs -o size=1m,mode=0700 mmshim-criu "$CRIU_RUNDIR" || die "cannot mount a tmpfs at $CRIU_RUNDIR"
  fi
  rm -f "$CRIU_RUNDIR/criu.kdat.tmp"  # left by a CRIU killed mid-save, it blocks every later save
}

pycriu_build() {
  # pycriu is not on PyPI: it lives in CRIU's lib/; its protobuf modules are generated by make.
  [ -f "$CRIU_SRC/lib/pycriu/images/pb.py" ] && return 0
  criu_source
  make -C "$CRIU_SRC" lib >>"$PREFIX/src/criu-build.log" 2>&1 || die "pycriu generation failed: see $PREFIX/src/criu-build.log"
}

venv_install() {
  [ -x "$VENV/bin/python3" ] || /usr/bin/python3 -m venv "$VENV"
  local stamp=$VENV/.mmshim-stamp want
  want=$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-16)-$REPO
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing mmshim and its dependencies into $VENV"
    "$VENV/bin/pip" install -q -e "$REPO[test]" "protobuf>=4.21,<6" >"$PREFIX/pip.log" 2>&1 ||
      die "pip install failed: see $PREFIX/pip.log"
    echo "$want" >"$stamp"
  fi
  if ! "$VENV/bin/python3" -c 'import pycriu.images' 2>/dev/null; then
    pycriu_build
    # Add CRIU's lib/ to the venv's path (its own packaging pins old setuptools behaviour).
    local site
    site=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$CRIU_SRC/lib" >"$site/pycriu-criu-src.pth"
    "$VENV/bin/python3" -c 'import pycriu.images' || die "pycriu does not import from $CRIU_SRC/lib"
  fi
  # The runtime entry points: the real interpreter with -IS (a PATH shim costs ~90 ms per call).
  "$VENV/bin/python3" "$REPO/install/write-entrypoints.py" "$VENV/bin/python3" /usr/local/bin
}

check() {
  /usr/local/sbin/criu check >/dev/null 2>&1 || die "criu check failed: $(/usr/local/sbin/criu check 2>&1 | tail -n 3)"
  [ -s "$CRIU_RUNDIR/criu.kdat" ] || log "WARNING: criu did not cache its kernel probe in $CRIU_RUNDIR (each start probes: ~30 ms)"
  command -v runc >/dev/null || die "runc is missing (Debian package runc)"
  command -v iptables-restore >/dev/null || die "iptables-restore missing: runc checkpoint needs it"
  command -v dockerd >/dev/null || die "dockerd is missing (Debian package docker.io)"
  log "criu: $(/usr/local/sbin/criu --version | head -n1); $(runc --version | head -n1); mmshim: $(/usr/local/bin/mmshim --version 2>&1 | head -n1)"
  log "host ready"
}

debian_packages
criu_build
criu_rundir
venv_install
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 bash "$REPO/install/setup-browser.sh"  # the viewer's browser tests
check
