#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go, for a session that has a GPU for a few minutes.
#
#   benchmarks/gpu_session.sh [gen] [gen-profile] [gen-pipeline] [gen-autotune] [train] [pack] [pack10k] [embed]
#   (default: gen train pack)
#
# Each part has its own time limit, so one slow or broken part cannot eat the others' time; logs
# and JSON go to $OUT (default runs/gpu). Wheels in .whl/ (e.g. diffusers, when the machine lacks
# it) are installed to /tmp/site first. Runs from the repository root without installing hyperface.
#
# A session has about 15 minutes of device time and 10 per call, and a machine's start takes one or
# two: in practice one long call, then a short one on the still-warm machine. Most wanted first
# (2026-11-27, after the H100 session whose profile showed torch already runs cuDNN's Hopper
# attention by default and the compiled sampler's device time split into convolutions, attention,
# matmuls and inductor's fused norm/activation kernels, about a quarter each):
#   call 1: gen          (about 8 min, timeout_s 540: the ratio, the compiled sampler against the same
#                         with 1x1 convolutions as matmuls and inductor's freezing; reference timed
#                         around each)
#           gen-pipeline (about 3 min, timeout_s 240: the whole generate loop, post-processing
#                         overlapped with rendering vs sequential, filter's FR model on the CPU)
#   later sessions: pack (the cyclic code on a GPU), pack10k, embed
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(gen train pack)

run() {  # run LIMIT LOG CMD...: one part, its own time limit, output to the log and the screen
  local limit=$1 log=$2; shift 2
  echo "=== $* (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e "^\[transformers\]" -e "it/s\]$" | tee -a "$log"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

for part in "${parts[@]}"; do
  case $part in
    gen)
      # Compiling the SD1.5-sized UNet and VAE decoder takes about two minutes; the reference is timed
      # before the first variant and after each (about 40 s a round on an H100), so each variant costs
      # about 3.5 minutes. mm1x1 (1x1 convolutions as matmuls) and freeze (inductor's freezing:
      # weights as constants, convolution weights in their best layout) are process-wide once set:
      # keep them last.
      run 520 "$OUT/generate.log" "$PY" benchmarks/generate.py --device cuda --images 128 --json "$OUT/generate.json" \
        --variants channels_last+compile+fuse_qkv@64,channels_last+fuse_qkv+mm1x1+freeze@64 ;;
    gen-profile)
      # No reference and no timing: one profiled batch per variant after its warm-up (about 2.5 min
      # for the compiled one on an H100). Eager profiles mislead: channels_last without compile
      # spends a quarter of the device time converting layouts.
      run 300 "$OUT/generate-profile.log" "$PY" benchmarks/generate.py --device cuda --profile --json "$OUT/generate-profile.json" \
        --variants channels_last+compile+fuse_qkv@64 ;;
    gen-pipeline)
      # Eager sampler (no compile: the loop's scheduling is what is measured), r50 filter on the CPU.
      run 220 "$OUT/generate-pipeline.log" "$PY" benchmarks/generate_pipeline.py --device cuda ;;
    gen-autotune)
      # Too slow for one call on the H100 (2026-11-27): every GEMM and convolution shape is
      # benchmarked for 8-47 s; 20 shapes in 7 minutes, and the compile had not finished.
      run 560 "$OUT/generate.log" "$PY" benchmarks/generate.py --device cuda --images 128 \
        --variants channels_last+autotune+fuse_qkv@64 ;;
    train)
      run 90 "$OUT/train.log" "$PY" benchmarks/train.py --device cuda
      # Compiling the r50 forward and backward takes about two minutes on a cold cache.
      run 200 "$OUT/train.log" "$PY" benchmarks/train.py --device cuda --compile ;;
    pack)
      # --symmetry auto picks the cyclic orbit code here; at 10^5 the unconstrained solver runs too.
      run 150 "$OUT/pack.log" "$PY" benchmarks/pack.py --device cuda --identities 100000 --budget 40 \
        --skip-baseline --skip-sweep --out "$OUT/pack100k"
      run 200 "$OUT/pack.log" "$PY" benchmarks/pack.py --device cuda --identities 1000000 --budget 100 \
        --skip-baseline --skip-sweep --skip-unconstrained --out "$OUT/pack1m" ;;
    pack10k)
      run 120 "$OUT/pack.log" "$PY" benchmarks/pack.py --device cuda --budget 30 --out "$OUT/pack10k" ;;
    embed)
      run 90 "$OUT/embed.log" "$PY" benchmarks/embed.py --device cuda ;;
    *) echo "unknown part $part (gen, gen-profile, gen-pipeline, gen-autotune, train, pack, pack10k, embed)"; exit 2 ;;
  esac
done
