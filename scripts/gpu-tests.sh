#!/usr/bin/env bash
# Builds every test binary of the workspace with the `cuda` feature on this (GPU-less) machine,
# collects them, stripped and xz-compressed, into gpu-tests/bin/ (git-ignored) with a runner, and
# prints the device `run` call that executes them on the GPU machine. See docs/cuda.md ("GPU tests").
#
#   bash scripts/gpu-tests.sh            # build the CUDA test targets + collect + print the run command(s)
#   bash scripts/gpu-tests.sh --all      # the same with every test binary of the workspace
#   bash scripts/gpu-tests.sh --collect  # collect from an existing build log only
#
# Needs /opt/cuda13-pip (shared/cuda/setup-cuda-build.sh). The carry limit of a device call is
# 64 MiB, so the binaries are stripped and compressed (`xz -T2 -6`, NAME.xz: ~6 MB each instead of
# ~36-55 MB), which normally puts all of them into one group, gpu-tests/bin/g1, and one `run` call;
# only if the compressed files together still exceed LIMIT are they split into more groups (g2, ...),
# one `run` call each. The runner decompresses a group's *.xz on the GPU machine before running it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-tests
LOG=$OUT/build.json
LIMIT=$((60 * 1024 * 1024)) # compressed bytes a group; below 64 MiB, leaving room for the runner and the working tree
mkdir -p "$OUT"

# The test targets that exercise CUDA code: the `cfg(feature = "cuda")` unit tests of kernels and
# mxfp4 and the test files that need a GPU (one cargo call per package: target filters are global).
# `--all` builds every test binary of the workspace.
GPU_TARGETS=(
    "-p gptoss-kernels --lib --test cuda"
    "-p gptoss-mxfp4 --lib --test cuda"
    "-p gptoss-model --test cuda"
    "-p gptoss-lora --test cuda_expert_lora --test peft_parity"
    "-p gptoss-sft --test cuda_lm_loss --test cuda_optim"
)
if [[ "${1:-}" != "--collect" ]]; then
    # shellcheck disable=SC1091
    source /opt/cuda13-pip/env.sh
    if [[ "${1:-}" == "--all" ]]; then
        GPU_TARGETS=("--workspace")
    fi
    : >"$LOG"
    for targets in "${GPU_TARGETS[@]}"; do
        # shellcheck disable=SC2086
        CARGO_TARGET_DIR=target-cuda cargo test --release --features cuda --no-run $targets \
            --message-format=json >>"$LOG"
    done
fi

rm -rf "${OUT:?}/bin"
mkdir -p "$OUT/bin"
# Test executables of the build: compiler-artifact messages with profile.test and an executable.
python3 - "$LOG" "$OUT/bin" <<'PY'
import json, os, shutil, sys
log, dest = sys.argv[1], sys.argv[2]
seen = set()
for line in open(log):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test"):
        continue
    exe = m.get("executable")
    if not exe or exe in seen:
        continue
    seen.add(exe)
    # the crate's directory relative to the repository root, "/" as "__" ("." for the root package)
    crate = os.path.relpath(os.path.dirname(m["manifest_path"])).replace(os.sep, "__")
    name = f'{crate}--{m["target"]["name"]}'
    shutil.copy2(exe, os.path.join(dest, name))
PY
strip "$OUT"/bin/* 2>/dev/null || true
# Compress each binary (NAME -> NAME.xz; xz drops the original and keeps its mode).
for f in "$OUT"/bin/*; do
    [[ -f "$f" ]] || continue
    xz -T2 -6 "$f"
done

# Group the compressed binaries so that each group stays under LIMIT (largest first).
group=1
size=0
mkdir -p "$OUT/bin/g$group"
while IFS= read -r f; do
    s=$(stat -c %s "$OUT/bin/$f")
    if ((size > 0 && size + s > LIMIT)); then
        group=$((group + 1))
        size=0
        mkdir -p "$OUT/bin/g$group"
    fi
    mv "$OUT/bin/$f" "$OUT/bin/g$group/"
    size=$((size + s))
done < <(cd "$OUT/bin" && ls -S -- *.xz)

{
cat <<RUN
#!/usr/bin/env bash
# Runs every test binary of one group on the GPU machine: bash gpu-tests/run.sh gpu-tests/bin/gN
# The binaries read fixtures through CARGO_MANIFEST_DIR, an absolute path of the build machine
# ($PWD): it is linked to this tree when absent. Each binary runs in its crate's directory, as
# under cargo test.
BUILD_ROOT="$PWD"
RUN
cat <<'RUN'
if [[ ! -e "$BUILD_ROOT" ]]; then mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$PWD" "$BUILD_ROOT"; fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
dir=${1:?group folder}
shopt -s nullglob
# The binaries travel xz-compressed: decompress them in place (the group folder is a copy).
for f in "$dir"/*.xz; do
    xz -d -T8 "$f" || { echo "FAILED: decompress $f"; exit 1; }
done
n=0
failed=0
root=$PWD
for t in "$dir"/*; do
    [[ -f "$t" ]] || continue
    chmod +x "$t"
    name=$(basename "$t")
    crate=${name%%--*}
    crate=${crate//__//}
    echo "=== $name (in $crate)"
    n=$((n + 1))
    (cd "$root/$crate" && "$root/$t" --test-threads=1) || { echo "FAILED: $name"; failed=$((failed + 1)); }
done
echo "gpu-tests: $n binaries, $failed failed"
((failed == 0))
RUN
} >"$OUT/run.sh"
chmod +x "$OUT/run.sh"

echo "Test binaries (stripped, xz-compressed):"
for g in "$OUT"/bin/g*; do
    echo "  $g: $(du -sb "$g" | cut -f1) bytes"
    for f in "$g"/*; do printf '    %10d  %s\n' "$(stat -c %s "$f")" "$(basename "$f")"; done
done
echo
ngroups=$(find "$OUT/bin" -mindepth 1 -maxdepth 1 -type d -name 'g*' | wc -l)
if ((ngroups == 1)); then
    echo "Device call (all binaries in one group):"
else
    echo "Device calls (one per group; the compressed binaries exceed $LIMIT bytes together):"
fi
for g in "$OUT"/bin/g*; do
    echo "  run(command=\"bash $OUT/run.sh $g\", carry=[\"$OUT/run.sh\", \"$g\"], timeout_s=600)"
done
