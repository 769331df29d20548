#!/usr/bin/env bash
# Kernel-time profile of one LoRA training step of a truncated gpt-oss-20b (ncu, one metric per kernel:
# gpu__time_duration), aggregated per kernel name, beside the same step's wall time without ncu.
#
#   bash benches/gpu_profile_step.sh OUTDIR [BIN] [LAYERS] [SEQ]
set -u
OUT=${1:?usage: gpu_profile_step.sh OUTDIR [BIN] [LAYERS] [SEQ]}
BIN=${2:-.carry/bin/bench_train_step}
LAYERS=${3:-2}
SEQ=${4:-2048}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ ! -f "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dk "$BIN.xz"; fi
chmod +x "$BIN"
"$BIN" --layers "$LAYERS" --seq "$SEQ" --steps 3 --warmup 1 --gc on 2>/dev/null | tee "$OUT/wall.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 400 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
  --log-file "$OUT/ncu.csv" "$BIN" --layers "$LAYERS" --seq "$SEQ" --steps 1 --warmup 0 --gc on >/dev/null 2>&1
python3 - "$OUT/ncu.csv" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr_i = next(i for i, r in enumerate(rows) if any("gpu__time_duration" in c for c in r))
hdr = rows[hdr_i]
ti = next(i for i, c in enumerate(hdr) if "gpu__time_duration" in c)
ni = next(i for i, c in enumerate(hdr) if c in ("Kernel Name", "Function Name", "Demangled Name")) if any(c in ("Kernel Name", "Function Name", "Demangled Name") for c in hdr) else next(i for i, c in enumerate(hdr) if "Name" in c)
unit = rows[hdr_i + 1][ti] if hdr_i + 1 < len(rows) else "?"
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[hdr_i + 1:]:
    if len(r) <= max(ti, ni):
        continue
    try:
        v = float(r[ti].replace(",", ""))
    except ValueError:
        continue
    k = r[ni][:70]
    agg[k][0] += 1
    agg[k][1] += v
tot = sum(v[1] for v in agg.values())
n = sum(v[0] for v in agg.values())
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit, 1e-6)
print(f"kernels: {n}, total GPU time {tot*scale:.1f} ms (unit {unit})")
for k, (c, v) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:18]:
    print(f"{v*scale:9.2f} ms {100*v/tot:5.1f}% {c:6d}x  {k}")
PY
true
