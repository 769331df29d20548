#!/usr/bin/env bash
# Issue 24's streaming bar on a synthetic gpt-oss-20b checkpoint (random MXFP4 experts, HF layout) with a
# random PEFT adapter of the cookbook's targets (`make_checkpoint --adapter`): `export --adapter` in each
# format, with wall time, peak RSS (/usr/bin/time; counts the mmapped source pages the export touched)
# and peak RssAnon (sampled from /proc every 0.2 s: the export's own memory, which the bar bounds by
# "the largest tensor + a shard buffer"). Host only (no GPU needed). Needs ≈ 14 GB for the checkpoint
# plus the largest output (bf16: 39 GB); outputs are removed after each format.
#   BIN=target/release/examples CK=/tmp/gpt-oss-20b-synthetic bash scripts/bench/export_streaming_20b.sh
#   FORMATS="mxfp4 gguf" ... (any of: mxfp4 gguf bf16)
set -eu
BIN=${BIN:-target/release/examples}
CK=${CK:-/tmp/gpt-oss-20b-synthetic}
AD=${AD:-$CK-adapter}
OUT=${OUT:-/tmp/export-streaming}
FORMATS=${FORMATS:-mxfp4 gguf bf16}
mkdir -p "$OUT"
if [ ! -f "$CK/config.json" ] || [ ! -f "$AD/adapter_config.json" ]; then
    rm -rf "$CK" "$AD"
    "$BIN"/make_checkpoint --arch 20b --out "$CK" --adapter "$AD" | tee "$OUT/make_checkpoint.txt"
fi
if [ ! -f "$CK/tokenizer.json" ] && [ -n "${RANKS:-}" ]; then
    python3 scripts/fixtures/harmony/o200k.py --ranks "$RANKS" --out "$CK/tokenizer.json" | tail -1
fi
# peak RssAnon (kB) of PID, sampled until it exits
peak_anon() {
    local pid=$1 peak=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$peak" ] && peak=$v
        sleep 0.2
    done
    echo "$peak"
}
for fmt in $FORMATS; do
    dest=$OUT/out-$fmt; [ "$fmt" = gguf ] && dest=$OUT/out.gguf
    rm -rf "$dest"
    /usr/bin/time -v -o "$OUT/time_$fmt.txt" "$BIN"/export --model "$CK" --adapter "$AD" --format "$fmt" \
        --out "$dest" > "$OUT/export_$fmt.txt" 2>&1 &
    tpid=$!
    sleep 0.5
    epid=$(pgrep -P "$tpid" -x export || true)
    anon=$(peak_anon "${epid:-$tpid}")
    wait "$tpid"
    {
        echo "== $fmt"
        grep -E "^merging|^exported" "$OUT/export_$fmt.txt"
        grep -E "Elapsed|Maximum resident" "$OUT/time_$fmt.txt"
        echo "peak RssAnon: $anon kB"
        du -sh "$dest"
    } | tee -a "$OUT/summary.txt"
    rm -rf "$dest"
done
