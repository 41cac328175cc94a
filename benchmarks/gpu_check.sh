#!/usr/bin/env bash
# The checks that need a CUDA machine, in one run from the repository root: the GPUs and versions, the test suite on
# CUDA, the throughput benchmark, and a 2-process NCCL search when the machine has 2 GPUs or more.
#
# Every stage prints a header and its wall time; everything is also written to $OUT/gpu_check.log when $OUT is set
# (the device machine sets it and brings back what is under it: the results are copied there too), else to
# benchmarks/results/gpu_check.log. A failed stage does not stop the later ones, which check other things; the exit
# status says whether any failed. The throughput runs twice: eager (bf16 and float32: the issue's targets, in the
# throughput_cuda section of RESULTS.md), then compiled against eager in bf16 (throughput_cuda_compile), so that
# torch.compile's minutes of compiling cannot cost the eager figures. Budget: under ~9 minutes on one H200, which
# the stage time limits enforce; a rerun can pick stages and limits, e.g.
#
#   STAGES="throughput compile" COMPILE_TIMEOUT=400 bash benchmarks/gpu_check.sh
set -euo pipefail

STAGES=${STAGES:-tests throughput compile ddp}
TEST_TIMEOUT=${TEST_TIMEOUT:-210}  # seconds; the suite takes 6-8 minutes on 2 CPU cores
THROUGHPUT_TIMEOUT=${THROUGHPUT_TIMEOUT:-90}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-210}  # compiling deit_small's dense, supernet and subnet steps
DDP_TIMEOUT=${DDP_TIMEOUT:-60}

RESULTS=benchmarks/results
LOG_DIR=${OUT:-$RESULTS}
mkdir -p "$LOG_DIR" "$RESULTS"
exec > >(tee "$LOG_DIR/gpu_check.log") 2>&1

failed=()

# stage NAME COMMAND...: run COMMAND under a header, then print its wall time and whether it failed.
stage() {
    local name=$1 start=$SECONDS status=0
    shift
    printf '\n=== %s ===\n+ %s\n' "$name" "$*"
    "$@" || status=$?
    if [ "$status" = 0 ]; then
        printf '=== %s: %d s, ok ===\n' "$name" $((SECONDS - start))
    else
        local why="exit $status"
        if [ "$status" = 124 ]; then why="timed out"; fi
        printf '=== %s: %d s, FAILED (%s) ===\n' "$name" $((SECONDS - start)) "$why"
        failed+=("$name")
    fi
}

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

setup_venv() {
    # A venv that imports the package is kept as it is; otherwise the Makefile builds it (pip install -e '.[dev]').
    .venv/bin/python -c "import spvit_search, torch" 2>/dev/null || make .venv/.installed
}

versions() {
    .venv/bin/python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{torch.cuda.device_count()} GPU(s), bf16 supported: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}")
EOF
}

# throughput TIMEOUT JSON ARGS...: the benchmark on CUDA at batch 128 (deit_small, few rounds: the budget), its
# figures in JSON and in RESULTS.md, both copied to $OUT. (Functions run in `||` context, where set -e is off.)
throughput() {
    local limit=$1 json=$RESULTS/$2 status=0
    shift 2
    timeout "$limit" .venv/bin/python benchmarks/throughput.py --device cuda --batch 128 \
        --models deit_small_patch16_224 --warmup 2 --loader-epochs 2 --out "$json" --update-results "$@" || status=$?
    if [ "$status" = 0 ] && [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$json" "$OUT/"; fi
    return "$status"
}

ddp_smoke() {
    local out=${OUT:-$(mktemp -d)}/ddp_smoke
    rm -rf "$out"
    timeout "$DDP_TIMEOUT" .venv/bin/torchrun --standalone --nproc_per_node 2 -m spvit_search.cli search \
        --model test_vit --img-size 32 --model-kwargs patch_size=4 --target 0.6x --epochs 1 --device cuda \
        --out "$out" --no-progress && cat "$out/summary.json"
}

total=$SECONDS
stage "GPUs" nvidia-smi -L
stage "venv" setup_venv
stage "versions" versions
if wanted tests; then
    stage "tests on CUDA" env SPVIT_TEST_DEVICE=cuda SPVIT_TEST_COMPILE_BACKEND=inductor timeout "$TEST_TIMEOUT" .venv/bin/python -m pytest -q -x
fi
if wanted throughput; then
    stage "throughput, eager" throughput "$THROUGHPUT_TIMEOUT" throughput_cuda.json --steps 8 --amp bf16 none \
        --compile off
fi
if wanted compile; then
    stage "throughput, compiled" throughput "$COMPILE_TIMEOUT" throughput_cuda_compile.json --steps 4 \
        --compile-steps 4 --amp bf16 --compile off on
fi
if wanted ddp; then
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    if [ "$gpus" -ge 2 ]; then
        stage "2-process NCCL search" ddp_smoke
    else
        printf '\n=== 2-process NCCL search: skipped (%d GPU) ===\n' "$gpus"
    fi
fi

printf '\n=== gpu_check: %d s in all; failed stages: %s ===\n' $((SECONDS - total)) "${failed[*]:-none}"
[ "${#failed[@]}" = 0 ]
