#!/usr/bin/env bash
# Device script (one H100/H200 call, ≈ 8 min): a synthetic gpt-oss-20b checkpoint (random MXFP4 experts,
# HF layout) feeds two measurements that need a 20b model and a large host:
#  - issue 19's packing bar: the trainer on the bundled Multilingual-Thinking sample at
#    settings (max_length 2048, gradient checkpointing, the trainer's default batch 1 × accumulation 4), unpacked and with
#    `--packing`; compare the logged tokens/s, which counts non-pad tokens;
#  - issue 24's export bar: `export --format gguf` and `--format bf16` wall time and peak RSS.
#
# Build here (CUDA binaries; see docs/cuda.md), stripped and xz-compressed into an ignored folder, e.g. devbin/:
#   make_checkpoint, finetune_multilingual, export  ->  devbin/<name>.xz
# and the o200k ranks (~/.cargo/registry/src/*/tiktoken-rs-0.12.1/assets/o200k_base.tiktoken) into
# devbin/: the gguf export needs a tokenizer.json, built there with scripts/fixtures/harmony/o200k.py
# (the device machine has transformers). Run on the device from the repository root, carrying devbin:
#   BIN=devbin bash scripts/bench/packing_export_20b.sh
#   PARTS="gguf" BIN=devbin bash scripts/bench/packing_export_20b.sh   # only some of: packing gguf bf16
set -u
BIN=${BIN:-devbin}
PARTS=${PARTS:-packing gguf bf16}
has() { [[ " $PARTS " == *" $1 "* ]]; }
OUT=${OUT:-/tmp/packing-export}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for f in "$BIN"/*.xz; do [ -f "$f" ] && xz -d -T8 "$f"; done
chmod +x "$BIN"/make_checkpoint "$BIN"/export
CK=/dev/shm/gpt-oss-20b-synthetic
/usr/bin/time -v "$BIN"/make_checkpoint --arch 20b --out "$CK" 2>&1 | grep -E "Elapsed|Maximum resident" | tee "$OUT/make_checkpoint.txt"
if [ -f "$BIN/o200k_base.tiktoken" ]; then
    python3 scripts/fixtures/harmony/o200k.py --ranks "$BIN/o200k_base.tiktoken" --out "$CK/tokenizer.json" 2>&1 | tail -2
fi
common=(--model "$CK" --dataset crates/sft/data/multilingual_thinking_sample.jsonl --max-steps 8 --eval-strategy no --eval-rows 0 --no-generate --report-to none
        --progress-bar false --save-steps 0)
has packing && chmod +x "$BIN"/finetune_multilingual && for mode in unpacked packed; do
    extra=(); [ "$mode" = packed ] && extra=(--packing true)
    timeout 240 "$BIN"/finetune_multilingual "${common[@]}" "${extra[@]}" --output-dir "/tmp/ft-$mode" 2>&1 \
        | grep -E "tokens/s|steady-state|peak device|dataset" | tee "$OUT/finetune_$mode.txt"
done
for fmt in gguf bf16; do
    has "$fmt" || continue
    dest=/tmp/export-$fmt; [ "$fmt" = gguf ] && dest=/tmp/export.gguf
    /usr/bin/time -v "$BIN"/export --model "$CK" --format "$fmt" --out "$dest" 2>&1 \
        | grep -E "Elapsed|Maximum resident|error" | tee "$OUT/export_$fmt.txt"
    du -sh "$dest" | tee -a "$OUT/export_$fmt.txt"; rm -rf "$dest"
done
