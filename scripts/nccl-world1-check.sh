#!/usr/bin/env bash
# Issue 25, device bar "one GPU": the NCCL data-parallel path at world size 1 must train exactly
# what the plain trainer trains. Runs the demo (tiny random gpt-oss, bundled sample rows) twice on
# the GPU, `--distributed off` and `--distributed nccl`, and compares the adapter files byte for
# byte (final and checkpoint-4) and the log_history records (wall-clock fields dropped).
#
# Build here (no GPU, no NCCL needed):
#   source /opt/cuda13-pip/env.sh
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features nccl --example finetune_multilingual
#   mkdir -p gpu-tests && strip -o gpu-tests/finetune_multilingual target-cuda/release/examples/finetune_multilingual
#   xz -T2 -6 -f gpu-tests/finetune_multilingual     # 119 MB stripped -> 33 MB, under the carry limit
# Run on the device, from the repository root (carry gpu-tests/finetune_multilingual.xz):
#   bash scripts/nccl-world1-check.sh
set -euo pipefail
BIN=${BIN:-gpu-tests/finetune_multilingual}
OUT=${OUT:-/tmp/nccl-world1}
if [[ ! -x "$BIN" && -f "$BIN.xz" ]]; then
    xz -dc "$BIN.xz" >/tmp/finetune_multilingual 2>/dev/null \
        || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$BIN.xz" /tmp/finetune_multilingual
    chmod +x /tmp/finetune_multilingual
    BIN=/tmp/finetune_multilingual
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [[ -z "${GPTOSS_NCCL_LIBRARY:-}" ]]; then
    lib=$(python3 -c 'import glob, site, sys
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for f in glob.glob(d + "/nvidia/nccl/lib/libnccl.so.2"):
        print(f); sys.exit()' 2>/dev/null || true)
    [[ -n "$lib" ]] || lib=$(find /usr /opt /root /home -name libnccl.so.2 2>/dev/null | head -n 1 || true)
    [[ -n "$lib" ]] || { echo "no libnccl.so.2 found (pip's nvidia-nccl / torch)"; exit 2; }
    export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NCCL: $lib"
fi
rm -rf "$OUT"
common=(--dataset crates/sft/data/multilingual_thinking_sample.jsonl --max-steps 8 --save-steps 4
        --eval-strategy no --eval-rows 0 --no-generate --report-to none --progress-bar false)
"$BIN" "${common[@]}" --output-dir "$OUT/plain" --distributed off
"$BIN" "${common[@]}" --output-dir "$OUT/nccl" --distributed nccl
# a second plain run: if it differs from the first, the GPU trainer itself is not deterministic
"$BIN" "${common[@]}" --output-dir "$OUT/plain2" --distributed off >/dev/null
cmp -s "$OUT/plain/adapter_model.safetensors" "$OUT/plain2/adapter_model.safetensors" \
    && echo "plain runs repeat bit for bit" || echo "WARNING: two plain runs differ (non-deterministic kernels)"
for f in adapter_model.safetensors checkpoint-4/adapter_model.safetensors checkpoint-4/optimizer.safetensors; do
    if [[ -f "$OUT/plain/$f" ]]; then
        cmp "$OUT/plain/$f" "$OUT/nccl/$f" && echo "identical bytes: $f"
    fi
done
python3 - "$OUT/plain/trainer_state.json" "$OUT/nccl/trainer_state.json" <<'PY'
import json, sys
def records(path):
    clock = ("_runtime", "_per_second")
    return [{k: v for k, v in e.items() if not k.endswith(clock)}
            for e in json.load(open(path))["log_history"]]
a, b = records(sys.argv[1]), records(sys.argv[2])
assert len(a) == len(b), (len(a), len(b))
for x, y in zip(a, b):
    assert x == y, (x, y)
print(f"identical log_history: {len(a)} records, losses {[e.get('loss') for e in a if 'loss' in e]}")
PY
echo "NCCL world-size-1 check: PASS"
