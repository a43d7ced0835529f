#!/usr/bin/env bash
# Installs the system packages and the Rust target cogvx needs (Debian/Ubuntu, as root or via sudo).
set -euo pipefail
# mesa-vulkan-drivers: Vulkan on the CPU (lavapipe) for the tests of the GPU code path (burn-wgpu).
# libopenmpi-dev, openmpi-bin: data-parallel training over several processes (`cogvx launch`, feature mpi).
pkgs="libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev clang pkg-config ffmpeg mesa-vulkan-drivers libopenmpi-dev openmpi-bin"
missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== apt: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
