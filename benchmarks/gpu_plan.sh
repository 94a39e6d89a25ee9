#!/usr/bin/env bash
# The GPU measurements behind the README's performance table, in steps that each fit one 10-minute call on a
# rented GPU machine (compiling the release-size denoiser takes about two minutes per shape). In order of what the
# GPU issue needs most (a 30-minute session fits about the first five):
#
#   bash benchmarks/gpu_plan.sh STEP
#
# e2e       the runner, 4 steps without CFG, torch.compile + CUDA graphs, TAESD-architecture decoder: offline
#           real-time factor and live first-frame latency
# chunks    the denoiser step alone at chunks 16, 24 and 32, compiled + graphed, fp16 (MFU per render-chunk size)
# tests     the GPU-marked tests (fp16 vs fp32, compiled and CUDA-graphed vs eager, runner with graphs, shared graphs)
# e2e-vae   4 steps without CFG with the SD VAE decoder (offline)
# e2e-8     8 steps without CFG, TAESD-architecture decoder (offline)
# e2e-cfg   30 steps with CFG 3.5 (offline, 4 s of speech)
# networks  the networks the last changes touched (UNet3D, decoders, SMGA): eager / compile / CUDA graph, fp16
# latency   a live session's output latency with the LIVE settings, 4 steps without CFG, eager (bench_latency)
# all       every step above, in that order
#
# Results are JSON under $OUT (when the machine runner sets it) or benchmarks/results/. A machine without
# diffusers/librosa gets them from the wheels in .whl/ (carried along; no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?"usage: bash benchmarks/gpu_plan.sh e2e|chunks|tests|e2e-vae|e2e-8|e2e-cfg|networks|latency|all"}
case "$step" in e2e|chunks|tests|e2e-vae|e2e-8|e2e-cfg|networks|latency|all) ;; *) echo "unknown step $step" >&2; exit 2 ;; esac
if ! python -c "import diffusers, librosa" 2>/dev/null; then
  python -m pip install -q --no-deps .whl/*.whl
fi
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")

run() { echo "+ $*" >&2; "$@"; }
case "$step" in
  e2e)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 4:1.0 --compile --cuda-graphs --decoder taesd \
      --out "$out/e2e-mmgt-taesd-compile-graphs-$gpu.json" ;;
  chunks)
    for c in 16 24 32; do
      run python -m benchmarks.bench_networks --preset mmgt --device cuda:0 --chunk "$c" --networks unet3d \
        --dtype fp16 --compile --cuda-graphs --no-analysis --max-seconds 4 --out "$out/networks-mmgt-unet3d-c$c-$gpu.json"
    done ;;
  tests)
    run python -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py ;;
  e2e-vae)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 4:1.0 --compile --cuda-graphs --decoder vae --no-live \
      --out "$out/e2e-mmgt-vae-compile-graphs-$gpu.json" ;;
  e2e-8)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 8:1.0 --compile --cuda-graphs --decoder taesd --no-live \
      --out "$out/e2e-mmgt-taesd-8steps-compile-graphs-$gpu.json" ;;
  e2e-cfg)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 30:3.5 --seconds 4 --compile --cuda-graphs --no-live \
      --out "$out/e2e-mmgt-cfg-compile-graphs-$gpu.json" ;;
  networks)
    run python -m benchmarks.bench_networks --preset mmgt --device cuda:0 --chunk 16 --dtype fp16 \
      --networks unet3d,vae_decode,taesd_decode,smga --compile --cuda-graphs --no-analysis --max-seconds 4 \
      --budget-s 400 --out "$out/networks-mmgt-changed-$gpu.json" ;;
  latency)
    run python -m benchmarks.bench_latency --preset mmgt --device cuda:0 --only default --steps 4 --guidance 1 \
      --out "$out/latency-mmgt-$gpu.json" ;;
  all)
    for s in e2e chunks tests e2e-vae e2e-8 e2e-cfg networks latency; do bash "$0" "$s"; done ;;
esac
