#!/usr/bin/env bash
# The GPU measurements behind the README's performance table, in steps that each fit one 10-minute call on a
# rented GPU machine (compiling the release-size denoiser takes about two minutes per shape):
#
#   bash benchmarks/gpu_plan.sh STEP        STEP: tests | networks | chunks | e2e | e2e-vae | e2e-cfg | all
#
# tests     the GPU-marked tests (fp16 vs fp32, compiled and CUDA-graphed vs eager, runner with graphs)
# networks  every network at the release sizes, chunk 16: eager / compile / CUDA graph, fp16 and fp32, MFU
# chunks    the denoiser step alone at chunks 24 and 32 (MFU and per-frame cost of larger render chunks)
# e2e       the runner, 4 and 8 steps without CFG, torch.compile + CUDA graphs, TAESD-architecture decoder;
#           offline RTF plus live first-frame latency
# e2e-vae   the same with the SD VAE decoder
# e2e-cfg   30 steps with CFG 3.5 (offline only)
#
# Results are JSON under $OUT (when the machine runner sets it) or benchmarks/results/. A machine without
# diffusers/librosa gets them from the wheels in .whl/ (carried along; no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?"usage: bash benchmarks/gpu_plan.sh tests|networks|chunks|e2e|e2e-vae|e2e-cfg|all"}
if ! python -c "import diffusers, librosa" 2>/dev/null; then
  python -m pip install -q --no-deps .whl/*.whl
fi
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")

run() { echo "+ $*" >&2; "$@"; }
case "$step" in
  tests)
    run python -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py ;;
  networks)
    run python -m benchmarks.bench_networks --preset mmgt --device cuda:0 --chunk 16 --compile --cuda-graphs \
      --budget-s 480 --out "$out/networks-mmgt-$gpu.json" ;;
  chunks)
    for c in 24 32; do
      run python -m benchmarks.bench_networks --preset mmgt --device cuda:0 --chunk "$c" --networks unet3d \
        --dtype fp16 --compile --cuda-graphs --no-analysis --out "$out/networks-mmgt-unet3d-c$c-$gpu.json"
    done ;;
  e2e)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 4:1.0 8:1.0 --compile --cuda-graphs --decoder taesd \
      --out "$out/e2e-mmgt-taesd-compile-graphs-$gpu.json" ;;
  e2e-vae)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 4:1.0 8:1.0 --compile --cuda-graphs --decoder vae \
      --out "$out/e2e-mmgt-vae-compile-graphs-$gpu.json" ;;
  e2e-cfg)
    run python -m benchmarks.bench_e2e --preset mmgt --configs 30:3.5 --seconds 4 --compile --cuda-graphs \
      --no-live --out "$out/e2e-mmgt-cfg-compile-graphs-$gpu.json" ;;
  all)
    for s in tests networks chunks e2e e2e-vae e2e-cfg; do bash "$0" "$s"; done ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
