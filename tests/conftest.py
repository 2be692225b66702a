"""Shared test set-up: strict rank promotion, fp64 available, fixture paths."""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# fp64 references are computed with numpy or with jax under explicit float64 dtypes;
# x64 must be on for the latter. Library code always names its dtypes explicitly.
jax.config.update("jax_enable_x64", True)

# Tests build many identical programs (same shapes, new closures): the persistent cache
# turns every recompilation after the first into a load.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="rwkv-jax-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("RWKV_JAX_SHARED", ROOT.parent / "shared"))
FIXTURES = pathlib.Path(os.environ.get("RWKV_JAX_FIXTURES", SHARED / "fixtures" / "tiny-rwkv"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """The tiny-rwkv fixture folder; skips with the reason when it is absent."""
    if not (FIXTURES / "reference-logits.npz").exists():
        pytest.skip(f"tiny-rwkv fixtures not found at {FIXTURES} (set RWKV_JAX_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.exists():
        pytest.skip(f"../shared not found at {SHARED} (set RWKV_JAX_SHARED)")
    return SHARED


# ---- the default command and the slow matrix ----------------------------------------------
# `python -m pytest` (the README's command, CI's) leaves out tests marked slow (pyproject's
# addopts); `python -m pytest -m slow` runs them. Besides the tests marked at their
# definition, the node ids matching these regexes (re.match) are slow: the exhaustive matrix
# over every fixture x every WKV form, whose every axis the default command still covers
# (every fixture in its default form, every form on one fixture, every form at op level
# against fp64). Chosen from measured durations (tens of seconds each on 2 cores).
SLOW_NODES = (
    # the model on every fixture in every form: on CPU "scan" is what "auto" runs; the Pallas
    # kernels are checked at op level (test_kernels_*) and on RWKV-7 here
    r"tests/test_parity\.py::.*-scan\]",
    r"tests/test_parity\.py::.*\[rwkv[456].*-pallas\]",
    r"tests/test_parity\.py::.*\[rwkv5\.[12]-tiny-730k-(chunked|associative)\]",
    r"tests/test_parity\.py::.*\[rwkv6-tiny-3m-associative\]",
    r"tests/test_parity\.py::test_inside_user_jit_and_grad\[rwkv[56]",
    r"tests/test_parity\.py::test_logits_to_keep\[rwkv[456]",
    r"tests/test_parity\.py::test_prefix_then_state_any_cut\[rwkv[56]",
    r"tests/test_generate\.py::test_greedy_matches_official\[rwkv(5\.1|6)",
    r"tests/test_versions\.py::test_version_trains_exports_generates\[(5\.1|5\.2|6)\]",
    # multi-process and multi-device runs (test_fsdp covers the 8-device mesh by default)
    r"tests/test_train\.py::test_two_processes_match_one_process_and_resume",
    r"tests/test_train\.py::test_data_parallel_on_8_cpu_devices_matches_one_device",
    r"tests/test_train\.py::test_raising_max_steps_continues",
    r"tests/test_train\.py::test_bf16_compute_trains",
    r"tests/test_train\.py::test_nonfinite_step_stops_and_keeps_checkpoint\[update\]",
    # the TPU (Mosaic) lowering in the TPU interpreter; the CPU interpreter runs by default
    r"tests/test_kernels_wkv\d\.py::test_tpu_layout_in_the_tpu_interpreter",
    # op level, against fp64: the sequence lengths 1, 7 and 129 (one token, odd, several
    # chunks with a tail) stay; 16 and 64 (one sub-chunk, one whole chunk) are the slow grid
    r"tests/test_(kernels_)?wkv\d\.py::test_\w+\[(\w+-)?(16|64)(-\w+)?\]",
    r"tests/test_wkv7\.py::test_forms_match_reference\[(dispatch|chunked64)-(1|7)\]",
    r"tests/test_wkv7\.py::test_not_jitted",
    # fine-tuning from every fixture: RWKV-5.2 and RWKV-7 stay (LoRA and state tuning run on
    # 5.2 and 4 elsewhere in the file)
    r"tests/test_finetune\.py::test_step0_is_the_checkpoints_own_loss\[rwkv(4|5\.1|6)",
    r"tests/test_finetune\.py::test_resume_is_exact\[.*-state-",
)


def pytest_collection_modifyitems(config, items):
    import re
    slow = re.compile("|".join(f"(?:{p})" for p in SLOW_NODES))
    for item in items:
        if slow.match(item.nodeid):
            item.add_marker(pytest.mark.slow)
