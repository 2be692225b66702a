#!/usr/bin/env bash
# The prepared one-call GPU check: the Pallas WKV kernels compiled on the GPU, then the speed of
# every WKV form against flash-linear-attention, results to $OUT. Under 8 minutes in all.
#
# For a session lent a GPU (device tool), from the repository root, in one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The device image has jax[cuda] 0.11, flax, optax, orbax, pytest, torch, triton and einops
# (see the device KINDS.md); rwkv_jax is imported from the working tree, nothing of it is
# installed. Without network there, flash-linear-attention comes as a carried wheel. Fetch it
# HERE, once, into the ignored folder .whl/ (never commit it; it travels through `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl fla-core==0.6.0
# (fla-core is pure Python; add einops==0.8.1 to the same command only if the image lacks it.)
# Without .whl/ the FLA rows are recorded as unavailable and everything else still runs.
#
# What it answers, files in $OUT (or ./out/gpu_check elsewhere; at most 8 come back):
#   env.txt      GPU, jax/jaxlib/torch/triton/fla versions
#   pytest.txt   tests/test_kernels_wkv{4,6,7}.py on the GPU: the kernels compiled by Triton
#                (not interpreted), against the fp64 references and the lax.scan forms
#   bench.txt    fwd and fwd+bwd ms of every form incl. the kernels, and FLA's chunk_rwkv6 /
#   bench.json   chunk_rwkv7, at B=8 T=4096 C=2048 (v6/v7: 32 heads of 64), ratios to the
#                Pallas kernel (benchmarks/bench_kernels.py); ../shared/docs/benchmarks.md
#                has the H100 peer numbers (official CUDA kernels, FLA 0.6.0)
#   (hook)       full-model training tokens/s + MFU, added by the lead (marked below)
# Time plan: env ~10 s, tests <= 160 s, benchmark <= 270 s (FLA <= 100 s of it, then the
# kernels first and the lax.scan forms last, no new entry after 220 s); the hook: what is left
# of the 8 minutes (~40 s as it stands).
set -uo pipefail
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  $PY - <<'EOF'
import importlib.metadata as md
for p in ("jax", "jaxlib", "flax", "torch", "triton", "fla-core", "einops"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
import jax
print(jax.devices())
EOF
} 2>&1 | tee "$OUT/env.txt"

# 1. the kernels compiled on the GPU (the CPU-only checks -- TPU interpreter, slow cases --
#    are deselected or skip themselves); no -x: every failing case is worth seeing
timeout 160 $PY -m pytest -q -p no:cacheprovider -m "not slow" --durations=10 \
  tests/test_kernels_wkv4.py tests/test_kernels_wkv6.py tests/test_kernels_wkv7.py \
  2>&1 | tee "$OUT/pytest.txt"

# 2. speed: every form, the kernels, and FLA (first, in its own process)
timeout 270 $PY benchmarks/bench_kernels.py --B 8 --T 4096 --C 2048 --head-size 64 \
  --repeats 10 --deadline-s 220 --fla-timeout-s 100 --json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.txt"

# ===== HOOK (lead): full-model training tokens/s + MFU at the 0.1B and 1.5B shapes =========
# Add here, within the ~40 s left, e.g. (one JSON file each, at most 3 more files in $OUT):
#   timeout 20 $PY benchmarks/bench_train.py ... --json "$OUT/train_0.1b.json"
#   timeout 20 $PY benchmarks/bench_train.py ... --json "$OUT/train_1.5b.json"
# ===== end of hook ==========================================================================
