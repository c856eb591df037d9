#!/usr/bin/env bash
# The student benchmark on a machine with a real GPU and CUDA PyTorch, in one go:
#   1. PyTorch fp32 on CUDA, the same work as torch_student.py (the baseline, same run),
#   2. deno task bench (round_trip, matmul, nf4_matmul, student) with --torch set to that,
#   3. the parity tests (ops, gpu, models, train, bench) on the GPU's WebGPU adapter,
#   4. the real-size check: a random Qwen3-4B in NF4 (scripts/student_scale.ts, then
#      scripts/train_scale.ts) beside PyTorch at the same sizes (torch_cuda.py --qwen3-4b).
#
#   bash scripts/gpu/run_bench.sh PERF_DIR OUT_DIR
#
# PERF_DIR holds torch_student.py and torch_baseline.py; OUT_DIR gets bench.log,
# gpu_bench.json, tests.log, scale.log, scale.json and torch.json. SCALE_TOKENS (default 64)
# sets the real-size prompt length; each stage has its own timeout (*_TIMEOUT, seconds).
# `deno` must be on PATH; set DENO_DIR and pass --cached-only through DENO_FLAGS on a machine
# without network.
set -u
[ $# -eq 2 ] || { sed -n 2,16p "$0"; exit 2; }
PERF=$1 OUT=$2
cd "$(dirname "$0")/../.."
mkdir -p "$OUT" bench-out
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
FLAGS=${DENO_FLAGS:-}
nvidia-smi -L 2>/dev/null; nproc
timeout 60 deno run $FLAGS --allow-read --allow-env mod.ts info 2>&1 | head -8
PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-150}" python3 scripts/gpu/torch_cuda.py "$PERF" \
  > bench-out/torch_cuda.json
echo "torch rc $? at $(el)"; tail -1 bench-out/torch_cuda.json
timeout "${BENCH_TIMEOUT:-220}" deno run $FLAGS --allow-read=. --allow-write=. --allow-env \
  scripts/bench.ts --torch bench-out/torch_cuda.json --json bench-out/gpu_bench.json \
  > "$OUT/bench.log" 2>&1
echo "bench rc $? at $(el)"; cp bench-out/gpu_bench.json "$OUT/" 2>/dev/null
grep -v "^  " "$OUT/bench.log" | grep -v "^nf4_\|^f32_" | tail -20
timeout "${TEST_TIMEOUT:-200}" deno test $FLAGS --allow-read --allow-write --allow-env --allow-run \
  --allow-net=127.0.0.1 ${TESTS:-tests/ops/ tests/gpu/ tests/models/ tests/train/ tests/bench/} \
  > "$OUT/tests.log" 2>&1
echo "tests rc $? at $(el)"
grep -E "FAILED|passed|failed" "$OUT/tests.log" | grep -v "\.\.\. ok" | tail -12
T=${SCALE_TOKENS:-64}
PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-150}" python3 scripts/gpu/torch_cuda.py "$PERF" \
  --tokens "$T" --qwen3-4b > bench-out/torch_4b.json
echo "torch 4b rc $? at $(el)"; tail -1 bench-out/torch_4b.json
cat bench-out/torch_cuda.json bench-out/torch_4b.json > "$OUT/torch.json"
timeout "${SCALE_TIMEOUT:-200}" deno run $FLAGS --allow-read --allow-write --allow-env --allow-run \
  scripts/student_scale.ts --dir /tmp/distill-qwen3-4b --json bench-out/scale.json --tokens "$T" \
  > "$OUT/scale.log" 2>&1
echo "student_scale rc $? at $(el)"
timeout "${TRAIN_SCALE_TIMEOUT:-150}" deno run $FLAGS --allow-read --allow-write --allow-env \
  scripts/train_scale.ts --qwen /tmp/distill-qwen3-4b --json bench-out/scale.json --tokens "$T" \
  --steps 3 >> "$OUT/scale.log" 2>&1
echo "train_scale rc $? at $(el)"; cp bench-out/scale.json "$OUT/" 2>/dev/null; tail -6 "$OUT/scale.log"
