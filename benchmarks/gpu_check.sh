#!/usr/bin/env bash
# The prepared GPU check: WKV forms' correctness on the accelerator, then their speed.
#
# For a session lent a GPU (device tool), from the repository root, in one call:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# The device image has jax[cuda] 0.11, flax, optax, orbax, pytest (see the device KINDS.md);
# the package is imported from the working tree, nothing is installed. Results land in $OUT
# (or ./out when run elsewhere): pytest log, one JSON per benchmark.
#
# What it answers:
#   1. do the WKV forms (compiled Pallas WKV-4 on Triton, associative, chunked v6/v7) pass the
#      same fp64-reference tests on the GPU as on CPU, and do the tiny fixtures still match the
#      official logits with AUTO's GPU choices (tests/test_parity.py)?
#   2. how fast is each form (bench_wkv4/6/7, fwd and fwd+bwd, ratios to lax.scan)?
#      ../shared/docs/benchmarks.md has the H100 peer numbers (official CUDA kernel, FLA).
set -uo pipefail
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi -L
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_wkv4.py tests/test_wkv6.py \
  tests/test_wkv7.py tests/test_parity.py 2>&1 | tee "$OUT/pytest.txt"

timeout 90 $PY benchmarks/bench_wkv4.py --forms scan associative pallas \
  --json "$OUT/wkv4.json" 2>&1 | tee "$OUT/bench.txt"
timeout 90 $PY benchmarks/bench_wkv6.py --json "$OUT/wkv6.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 90 $PY benchmarks/bench_wkv7.py --chunks 16 64 2>&1 | tee -a "$OUT/bench.txt"
