"""FSDP / tensor-parallel sharding: the rules each version declares, losses that do not
depend on the mesh, parameter bytes per device, checkpoints resumed on another mesh (another
device count included), and FSDP across two processes.

Training runs go to subprocesses with 8 forced CPU host devices (the test process itself
has one device); several runs share one subprocess to pay JAX's start-up once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import rwkv_jax
from rwkv_jax import versions
from rwkv_jax.config import ConfigError
from rwkv_jax.model.functional import tree_names
from rwkv_jax.train import mesh as mesh_lib
from rwkv_jax.versions.base import LOGICAL_AXES

from test_train import _cfg, _cli_train, _losses, _overrides  # noqa: E402

FORCE_8 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


# ---- the rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", versions.VERSIONS)
def test_every_parameter_has_declared_axes_and_matrices_split_over_fsdp(version):
    """Each version's SPEC.param_axes names every parameter of its model with known logical
    axes of the right rank; under fsdp=4 (and fsdp=2 x tensor=2) every parameter with a
    dimension of the model's width is split, and the per-device bytes are ~1/4."""
    cfg = rwkv_jax.RWKVConfig.tiny(version).replace(n_embd=128, vocab_size=256)
    model = nnx.eval_shape(lambda: rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    spec = versions.spec(version)
    assert all(a in LOGICAL_AXES for _, axes in spec.param_axes for a in axes if a)
    assert {logical for logical, _ in mesh_lib.LOGICAL_AXIS_RULES} <= set(LOGICAL_AXES)
    total = split_bytes = 0
    for name, p in zip(jax.tree.leaves(tree_names(params)), jax.tree.leaves(params)):
        axes = mesh_lib.logical_axes(name, spec.param_axes)
        assert axes is not None, f"{name}: no logical axes in RWKV-{version}'s param_axes"
        assert len(axes) == p.ndim, (name, axes, p.shape)
        for mesh_shape in ({"data": 2, "fsdp": 4, "tensor": 1},
                           {"data": 1, "fsdp": 2, "tensor": 2}):
            pspec, skipped = mesh_lib.partition_spec(axes, p.shape, mesh_shape)
            assert not skipped, (name, skipped)  # 128 and 256 divide everything
            used = {a for part in pspec if part for a in
                    ((part,) if isinstance(part, str) else part)}
            if sum(d > 1 for d in p.shape) >= 2 and max(p.shape) >= cfg.n_embd:
                assert "fsdp" in used, (name, p.shape, pspec)
            if mesh_shape["fsdp"] == 4:
                n = int(np.prod(p.shape)) * p.dtype.itemsize
                total += n
                split_bytes += n // 4 if "fsdp" in used else n
    assert split_bytes < 1.3 * total / 4, (split_bytes, total)


@pytest.mark.parametrize("axes, shape, mesh_shape, want, skipped", [
    # vocab does not divide tensor=2: replicated there; embed over fsdp
    (("vocab", "embed"), (50277, 768), {"fsdp": 8, "tensor": 2}, P(None, "fsdp"),
     [("vocab", 50277, "tensor", 2)]),
    (("ffn", "embed"), (3072, 768), {"fsdp": 4, "tensor": 2}, P("tensor", "fsdp"), []),
    (("embed", "embed"), (768, 768), {"fsdp": 4}, P("fsdp", None), []),  # one axis once
    (("lora", "heads"), (64, 768), {"fsdp": 4}, P(None, "fsdp"), []),  # heads -> fsdp
    (("lora", "heads"), (64, 768), {"fsdp": 4, "tensor": 2}, P(None, ("tensor", "fsdp")),
     []),
    (("lora", "heads"), (64, 20), {"fsdp": 4, "tensor": 2}, P(None, "tensor"),
     [("heads", 20, "fsdp", 4)]),
    # embed 66 does not divide fsdp=4, ffn 264 does: the ffn -> fsdp fallback takes it
    (("ffn", "embed"), (264, 66), {"fsdp": 4}, P("fsdp", None), []),
    (("embed", "lora"), (66, 32), {"fsdp": 4}, P(None, None), [("embed", 66, "fsdp", 4)]),
    ((None, None, "channel"), (1, 1, 768), {"fsdp": 8, "tensor": 2}, P(None, None, None),
     []),
    (("vocab", "embed"), (256, 64), {"fsdp": 1, "data": 8}, P(None, None), []),
])
def test_partition_spec(axes, shape, mesh_shape, want, skipped):
    got, notes = mesh_lib.partition_spec(axes, shape, mesh_shape)
    assert got == want
    assert notes == skipped


def test_partition_spec_rank_mismatch_names_the_parameter():
    with pytest.raises(ValueError, match="do not fit shape"):
        mesh_lib.partition_spec(("embed",), (4, 4), {"fsdp": 2})


@pytest.mark.parametrize("overrides, message", [
    ((2, 4, 1), r"= 8 devices, but only 1 are available"),
    ((-1, -1, 1), "mesh.data and mesh.fsdp cannot all be -1"),
    ((1, 0, 1), "mesh.fsdp: must be a positive number of devices or -1"),
    ((1, 1, -3), "mesh.tensor: must be a positive number"),
    ((-1, 2, 1), "mesh.fsdp=2 x mesh.tensor=1 does not divide the 1 devices"),
])
def test_mesh_errors_name_the_key(overrides, message):
    data, fsdp, tensor = overrides
    with pytest.raises(ConfigError, match=message):
        mesh_lib.build_topology(data, fsdp, 8, tensor)


def test_one_device_mesh_fills_with_minus_one():
    topo = mesh_lib.build_topology(-1, 1, 4)
    assert topo.shape == {"data": 1, "fsdp": 1, "tensor": 1}


# ---- training on 8 forced host devices -------------------------------------------------------
_RUNNER = textwrap.dedent("""
    import json, sys
    import jax
    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.trainer import Trainer

    def device_bytes(tree):
        per = {}
        for x in jax.tree.leaves(tree):
            for s in x.addressable_shards:
                per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
        return per

    out = []
    for overrides, stop_at in json.loads(sys.argv[1]):
        t = Trainer(load_config(None, overrides))
        rec = {"mesh": dict(t.topology.mesh.shape), "resumed": t.restore_latest()}
        same = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                            (t.state.params, t.state.opt_state),
                            (t.state_shardings.params, t.state_shardings.opt_state))
        rec["shardings_as_planned"] = all(jax.tree.leaves(same))
        rec["param_bytes"] = device_bytes(t.state.params)
        rec["opt_bytes"] = device_bytes(t.state.opt_state)
        rec["param_total"] = sum(x.nbytes for x in jax.tree.leaves(t.state.params))
        rec["opt_total"] = sum(x.nbytes for x in jax.tree.leaves(t.state.opt_state))
        t.fit(stop_at=stop_at)
        out.append(rec)
    print("RESULT " + json.dumps(out))
""")


def _run_many(runs: list[tuple[object, int | None]], env_extra=FORCE_8) -> list[dict]:
    """``Trainer(cfg).fit(stop_at)`` for each ``(cfg, stop_at)`` in one fresh process with
    8 host devices; per run: the mesh, whether it resumed, whether the arrays have the
    planned shardings after set-up/restore, and per-device / total bytes."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **env_extra}
    arg = json.dumps([(_overrides(cfg), stop) for cfg, stop in runs])
    proc = subprocess.run([sys.executable, "-c", _RUNNER, arg], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _assert_same_losses(got, want, rtol=1e-5):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=rtol, atol=0)


def _assert_split(rec, fsdp):
    """Every device holds about 1/fsdp of the parameters and of the optimizer state."""
    for kind in ("param", "opt"):
        per, total = rec[f"{kind}_bytes"], rec[f"{kind}_total"]
        assert len(per) == np.prod(list(rec["mesh"].values()))
        assert max(per.values()) <= 1.3 * total / fsdp, (kind, per, total)
        if fsdp > 1:
            assert max(per.values()) < total / 2  # really split, not replicated


def test_fsdp_matches_one_device_and_splits_the_bytes(tmp_path):
    """2 (data) x 4 (fsdp) on 8 host devices: the per-step losses of 1 device, and each
    device holds ~1/4 of the parameter and optimizer bytes."""
    extra = ("train.max_steps=4", "checkpoint.every=4", "train.eval_every=4",
             "train.batch_size=8")
    one = _cfg(tmp_path / "one", *extra, "mesh.data=1")
    fsdp = _cfg(tmp_path / "fsdp", *extra, "mesh.data=2", "mesh.fsdp=4")
    r_one, r_fsdp = _run_many([(one, None), (fsdp, None)])
    assert r_one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert r_fsdp["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r_fsdp["shardings_as_planned"]
    _assert_split(r_fsdp, 4)
    assert r_fsdp["param_total"] == r_one["param_total"]
    assert max(r_one["param_bytes"].values()) == r_one["param_total"]
    _assert_same_losses(_losses(fsdp.out_dir), _losses(one.out_dir))


@pytest.mark.slow
def test_losses_do_not_depend_on_the_mesh_and_resume_on_other_meshes(tmp_path):
    """16 steps on 1 device, on 2x4 (data x fsdp), 8x1 (pure data parallel), 1x8 (pure
    FSDP) and 2x2x2 (with tensor parallelism): the same losses (fp32, 1e-5). The 2x4 run's
    step-8 checkpoint resumed on 1x8 and on 1 device continues with the 2x4 run's losses."""
    extra = ("train.max_steps=16", "checkpoint.every=8", "train.eval_every=8",
             "train.batch_size=8")
    meshes = {"one": ("mesh.data=1",), "2x4": ("mesh.data=2", "mesh.fsdp=4"),
              "8x1": ("mesh.data=8",), "1x8": ("mesh.data=1", "mesh.fsdp=8"),
              "2x2x2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")}
    cfgs = {k: _cfg(tmp_path / k, *extra, *v) for k, v in meshes.items()}
    recs = dict(zip(cfgs, _run_many([(c, None) for c in cfgs.values()])))
    want = _losses(cfgs["one"].out_dir)
    assert len(want) == 16
    for k in ("2x4", "8x1", "1x8", "2x2x2"):
        assert recs[k]["shardings_as_planned"], k
        _assert_same_losses(_losses(cfgs[k].out_dir), want)
    _assert_split(recs["1x8"], 8)
    _assert_split(recs["2x4"], 4)
    _assert_split(recs["8x1"], 1)

    # resume the 2x4 run's step-8 checkpoint on other meshes
    src = pathlib.Path(cfgs["2x4"].out_dir)
    resumed = {}
    for k, mesh in (("1x8", ("mesh.data=1", "mesh.fsdp=8")), ("one", ("mesh.data=1",))):
        dst = tmp_path / f"resume-{k}" / "run"
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "checkpoints" / "16")
        (dst / "model.safetensors").unlink()
        resumed[k] = _cfg(tmp_path / f"resume-{k}", *extra, *mesh)
        assert resumed[k].out_dir == str(dst)
    recs = _run_many([(c, None) for c in resumed.values()])
    two_by_four = _losses(src)
    for rec, cfg in zip(recs, resumed.values()):
        assert rec["resumed"] and rec["shardings_as_planned"], rec
        got = _losses(cfg.out_dir)
        assert got[:8] == two_by_four[:8]  # kept from before the checkpoint
        _assert_same_losses(got[8:], two_by_four[8:])
        assert (pathlib.Path(cfg.out_dir) / "model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_over_two_processes_matches_one_process_and_resumes_resharded(tmp_path):
    """2 local processes x 2 CPU devices: mesh.fsdp=4 (the parameters split across both
    processes) gives the 1-process losses and the same exported model; its step-6
    checkpoint resumes with mesh.fsdp=2 (data=2: each process holds whole parameters) and
    continues with the same losses. (Exporting gathers across processes: every process
    takes part, or process 0 would wait forever.)"""
    extra = ("train.max_steps=12", "train.eval_every=6", "checkpoint.every=6")
    one = _cfg(tmp_path / "one", *extra)
    [(code, err)] = _cli_train(one, tmp_path)
    assert code == 0, err[-2000:]
    # sample_tokens: process 0 samples from the model all processes gathered for the export
    two = _cfg(tmp_path / "two", *extra, "mesh.data=1", "mesh.fsdp=4", "train.sample_tokens=4")
    results = _cli_train(two, tmp_path, n_processes=2, devices_per_process=2)
    assert [c for c, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "2 processes x 2 devices, mesh data=1 fsdp=4" in results[0][1]
    assert "per device:" in results[0][1]
    a, b = _losses(one.out_dir), _losses(two.out_dir)
    assert [s for s, _ in b] == list(range(1, 13))
    _assert_same_losses(b, a)
    from rwkv_jax.checkpoint import model_tensors
    t1, t2 = model_tensors(rwkv_jax.load(one.out_dir)), model_tensors(rwkv_jax.load(two.out_dir))
    assert t1.keys() == t2.keys()
    for k in t1:
        np.testing.assert_allclose(t2[k], t1[k], rtol=1e-3, atol=1e-5, err_msg=k)

    run = pathlib.Path(two.out_dir)
    shutil.rmtree(run / "checkpoints" / "12")
    (run / "model.safetensors").unlink()
    resharded = _cfg(tmp_path / "two", *extra, "mesh.data=2", "mesh.fsdp=2")
    results = _cli_train(resharded, tmp_path, n_processes=2, devices_per_process=2)
    assert [c for c, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "resumed at step 6" in results[0][1] and "mesh data=2 fsdp=2" in results[0][1]
    c = _losses(run)
    assert c[:6] == b[:6]
    _assert_same_losses(c, b)
