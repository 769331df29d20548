#!/usr/bin/env bash
# Runs the LoRA training-step comparison on a CUDA machine, ours and transformers+PEFT in one go.
#
#   bash benches/gpu_train_step.sh OUTDIR [BIN] [PARTS]
#
# BIN: the bench_train_step binary built with `--features cuda` (default .carry/bin/bench_train_step,
# decompressed from BIN.xz when only that exists). PARTS: a comma list of check,ours,theirs,ours_nogc,
# theirs_nogc,breakdown (default all). Needs python3 with torch + transformers >= 5 + peft 0.21
# (a peft wheel in .carry/whl is installed into /tmp/site when peft is missing). Logs go to OUTDIR.
set -u
OUT=${1:?usage: gpu_train_step.sh OUTDIR [BIN] [PARTS]}
BIN=${2:-.carry/bin/bench_train_step}
PARTS=${3:-check,ours,theirs,ours_nogc,theirs_nogc,breakdown}
STEPS=${STEPS:-3}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
if [ ! -f "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dk "$BIN.xz"; fi
chmod +x "$BIN"
if ! python3 -c 'import peft' 2>/dev/null && ls .carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
has() { case ",$PARTS," in *",$1,"*) return 0;; *) return 1;; esac; }
has check && timeout 120 "$BIN" --check 2>&1 | tee "$OUT/check.log"
has ours && timeout 200 "$BIN" --seq 1024,2048 --steps "$STEPS" --warmup 1 --gc on 2>&1 | tee "$OUT/ours.log"
has theirs && timeout 200 python3 benches/baseline_transformers_peft.py --seq 1024,2048 --steps "$STEPS" --warmup 1 --gc on 2>&1 | grep -v Warning | tee "$OUT/theirs.log"
has ours_nogc && timeout 120 "$BIN" --seq 1024,2048 --steps "$STEPS" --warmup 1 --gc off 2>&1 | tee "$OUT/ours_nogc.log"
has theirs_nogc && timeout 120 python3 benches/baseline_transformers_peft.py --seq 1024,2048 --steps "$STEPS" --warmup 1 --gc off 2>&1 | grep -v Warning | tee "$OUT/theirs_nogc.log"
has breakdown && timeout 120 "$BIN" --seq 2048 --steps 1 --warmup 0 --gc on --breakdown 2>/dev/null | tee "$OUT/breakdown.log"
true
