#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go, for a session that has a GPU for a few minutes.
#
#   benchmarks/gpu_session.sh [gen] [gen-autotune] [train] [pack] [pack10k] [embed]   (default: gen train pack)
#
# Each part has its own time limit, so one slow or broken part cannot eat the others' time; logs
# and JSON go to $OUT (default runs/gpu). Wheels in .whl/ (e.g. diffusers, when the machine lacks
# it) are installed to /tmp/site first. Runs from the repository root without installing hyperface.
#
# A session has about 15 minutes of device time and 10 per call. Most wanted first (2026-11-27, after
# the H100 session that timed gen and train):
#   call 1: gen          (8-9 min, timeout_s 590: cuDNN attention first under compile + fused QKV, beside
#                         compile + fused QKV alone, in one process)
#   call 2 (or the next session): gen-autotune (up to 9 min: max-autotune, the last untimed lever)
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
      # before the first variant and after each (about 40 s a round on an H100).
      # SD1.5's first level has head dimension 40: cuDNN's Hopper attention may beat flash there.
      run 540 "$OUT/generate.log" "$PY" benchmarks/generate.py --device cuda --images 128 \
        --variants channels_last+compile+fuse_qkv+cudnn_attn@64,channels_last+compile+fuse_qkv@64 ;;
    gen-autotune)
      # max-autotune benchmarks many kernels per layer: a long compile, so a part of its own.
      run 560 "$OUT/generate.log" "$PY" benchmarks/generate.py --device cuda --images 128 \
        --variants channels_last+autotune+fuse_qkv+cudnn_attn@64 ;;
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
    *) echo "unknown part $part (gen, gen-autotune, train, pack, pack10k, embed)"; exit 2 ;;
  esac
done
