#!/usr/bin/env bash
# One-command set-up on a fresh Debian/Ubuntu machine (or CI):
#   system packages (audio, test speech, a browser for the WebRTC page test, Xvfb for the preview window test),
#   a virtual environment in .venv, the CPU build of torch where no NVIDIA GPU is present,
#   then this package with the extras the tests use, at the versions of constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
APT_PACKAGES="libportaudio2 espeak-ng sox ffmpeg chromium chromium-driver iproute2 xvfb"

if command -v apt-get >/dev/null 2>&1 && [ "${SKIP_APT:-0}" != "1" ]; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip wheel setuptools

# Versions known to pass (constraints.txt; README.md says how to refresh it). torch first: without a GPU take the CPU
# build, so the pinned version pulls nothing more.
PIN="-c constraints.txt"
if ! $VPY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $VPY -m pip install -q $PIN torch
  else
    $VPY -m pip install -q $PIN torch ||
      $VPY -m pip install -q $PIN torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# the package with every extra the tests use (tensorrt and ort-gpu are for GPU machines: install them there by hand)
$VPY -m pip install -q $PIN -e ".[serve,export,ort,mic,live,piper,pipecat,ray,dev]"
echo "set-up done: .venv ready ($($VPY -c 'import torch; print("torch", torch.__version__)'))"
