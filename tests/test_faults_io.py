"""Hostile and broken checkpoint and state files: each is built here, refused with one clear
error naming the file and the problem, and (where memory is at stake) loaded in a child
process whose peak memory must stay within a small bound above its baseline."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pathlib
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax import CheckpointError, RWKVConfig
from rwkv_jax.checkpoint import read_tensors, verify
from rwkv_jax.io.pth import _PickleEmitter, read_pth, write_pth
from rwkv_jax.state import StateError, load_state, save_state, state_arrays

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIB = 1 << 20
MEMORY_BOUND_MB = 300  # peak RSS a hostile load may add above the child's baseline
BOMB_MIB = 2048  # the zip bombs inflate to 2 GiB
BOMB_STATE_BATCH = 1 << 26  # [B, 8] float32 = 2 GiB
FIXTURE4 = "rwkv4-tiny-660k.pth"


# ---------------------------------------------------------------------------------- builders
def _pickle(tensors: list[tuple[str, str, int, tuple, int, tuple | None]]) -> bytes:
    """data.pkl of ``{name: FloatStorage tensor}`` from (name, key, numel, size, offset,
    stride) with any geometry (the writer only emits contiguous ones)."""
    em = _PickleEmitter()
    em.op(pickle.EMPTY_DICT)
    em.op(pickle.MARK)
    for name, key, numel, size, offset, stride in tensors:
        em.text(name)
        em.tensor(key, "FloatStorage", numel, size, offset, stride)
    em.op(pickle.SETITEMS)
    em.op(pickle.STOP)
    return bytes(em.out)


def _write_zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _raw_zip(path: pathlib.Path, members: list[tuple[str, bytes, int, int, int]]) -> pathlib.Path:
    """A zip written byte by byte: (name, stored data, method, crc, claimed size) per member,
    so a deflate stream and the sizes it claims can disagree."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        n = name.encode()
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21,
                               crc, len(data), size, len(n), 0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data),
                           size, len(n), 0) + n + data
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members),
                       len(central), len(out), 0)
    path.write_bytes(bytes(out + central + eocd))
    return path


def _npy_prefix(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a float32 array of ``shape`` (the data would follow)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _bomb_stream() -> tuple[bytes, int, int, bytes]:
    """(raw deflate stream, its CRC-32, inflated size, its first bytes): a .npy header for
    [BOMB_STATE_BATCH, 8] float32 then 2 GiB of zeros, from ~2 MB. After a full flush deflate
    keeps no history, so one compressed MiB of zeros can be repeated."""
    prefix = _npy_prefix((BOMB_STATE_BATCH, 8))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    stream = head + block * BOMB_MIB + c.flush()
    crc, zero = zlib.crc32(prefix), bytes(MIB)
    for _ in range(BOMB_MIB):
        crc = zlib.crc32(zero, crc)
    return stream, crc, len(prefix) + BOMB_MIB * MIB, prefix


def _bomb_pth(path: pathlib.Path, numel: int, claimed: int | None = None) -> pathlib.Path:
    """A .pth whose storage '0' inflates to 2 GiB; the pickle declares ``numel`` floats for
    it and one tensor 'x' of all of them; the zip claims ``claimed`` bytes (default: true)."""
    stream, crc, size, prefix = _bomb_stream()
    if claimed is not None:  # the CRC of what the claim covers, so only the size lies
        crc = zlib.crc32(prefix[:claimed])
    pkl = _pickle([("x", "0", numel, (numel,), 0, None)])
    return _raw_zip(path, [("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                           ("archive/data/0", stream, 8, crc, size if claimed is None else
                            claimed)])


def _big_member_pth(path: pathlib.Path, mib: int = 400) -> pathlib.Path:
    """A 5 MB .pth whose storage member honestly inflates to ``mib`` MiB at ~90:1 (under
    the zip-bomb ratio), of which the one tensor 'x' addresses the first 16 floats."""
    block = bytearray(MIB)
    block[:11000] = np.random.default_rng(0).bytes(11000)  # keeps the ratio below 100:1
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    pkl = _pickle([("x", "0", 16, (16,), 0, None)])
    return _raw_zip(path, [("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                           ("archive/data/0", piece * mib + c.flush(), 8, crc, mib * MIB)])


def _stride_pth(path: pathlib.Path, n: int) -> pathlib.Path:
    """A tiny .pth whose tensor 'x' is an [n, n] view with stride 0 of a 1-float storage."""
    return _write_zip(path, {"archive/data.pkl": _pickle([("x", "0", 1, (n, n), 0, (0, 0))]),
                             "archive/data/0": np.float32(1).tobytes()})


def _copies_pth(path: pathlib.Path, n_views: int) -> pathlib.Path:
    """A 4 MB .pth with ``n_views`` transposed (hence copied) views of one 1024x1024 storage."""
    views = [(f"t{i}", "0", 1024 * 1024, (1024, 1024), 0, (1, 1024)) for i in range(n_views)]
    return _write_zip(path, {"archive/data.pkl": _pickle(views),
                             "archive/data/0": np.ones(1024 * 1024, np.float32).tobytes()})


def _bomb_state(path: pathlib.Path) -> pathlib.Path:
    """An .npz state whose '0.att_x_prev' member inflates to 2 GiB of [2^26, 8] float32; the
    header agrees (batch_size 2^26), so only the member's size is hostile."""
    stream, crc, size, _ = _bomb_stream()
    header = np.array(json.dumps({
        "format": "rwkv-jax-state", "format_version": 1, "rwkv_version": "4", "n_layer": 1,
        "n_embd": 8, "batch_size": BOMB_STATE_BATCH}))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, header)
    h = buf.getvalue()
    return _raw_zip(path, [("__header__.npy", h, 0, zlib.crc32(h), len(h)),
                           ("0.att_x_prev.npy", stream, 8, crc, size)])


def _safetensors(path: pathlib.Path, header: dict | list | bytes, data: bytes = b"",
                 length: int | None = None) -> pathlib.Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _tiny_model(version: str = "4", n_embd: int = 8) -> rwkv_jax.RWKV:
    heads = {} if version == "4" else {"head_size": 4}
    cfg = RWKVConfig(version=version, vocab_size=16, n_layer=1, n_embd=n_embd, **heads)
    return rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------ memory: child runs
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import rwkv_jax
    from flax import nnx
    from rwkv_jax.io.pth import read_pth
    from rwkv_jax.state import load_state
    cfg = rwkv_jax.RWKVConfig(version="4", vocab_size=16, n_layer=1, n_embd=8)
    model = rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))
    calls = {"read_pth": read_pth, "load": rwkv_jax.load,
             "load_state": lambda p: load_state(p, model)}
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base, out = peak_mb(), {}
    for name, call, path in json.loads(sys.argv[1]):
        try:
            value = calls[call](path)
            r = {"error": None, "value": {k: list(v.shape) for k, v in value.items()}}
        except Exception as e:
            r = {"error": type(e).__name__, "message": str(e)}
        r["peak_mb"] = peak_mb() - base
        out[name] = r
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[pathlib.Path, dict]]:
    """Every memory-hostile file, loaded once in one child: name -> (file, child's result)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss is in KiB on Linux only")
    d = tmp_path_factory.mktemp("hostile")
    cases = {
        # (builder, how the child loads it)
        "bomb_small_tensor": (lambda p: _bomb_pth(p, 16), "read_pth"),
        "bomb_whole_tensor": (lambda p: _bomb_pth(p, BOMB_MIB * MIB // 4), "read_pth"),
        "bomb_claims_64_bytes": (lambda p: _bomb_pth(p, 16, claimed=64), "read_pth"),
        "bomb_pickle_wants_2gib": (lambda p: _bomb_pth(p, BOMB_MIB * MIB // 4, claimed=64),
                                   "read_pth"),
        "bomb_via_load": (lambda p: _bomb_pth(p, 16), "load"),
        "big_member_small_tensor": (_big_member_pth, "read_pth"),
        "stride0_2gib": (lambda p: _stride_pth(p, 23170), "read_pth"),
        "stride0_64gib": (lambda p: _stride_pth(p, 131072), "load"),
        "overlapping_copies": (lambda p: _copies_pth(p, 200), "read_pth"),
        "bomb_state": (_bomb_state, "load_state"),
    }
    files = {}
    for name, (build, _) in cases.items():
        suffix = ".npz" if name.endswith("state") else ".pth"
        files[name] = build(d / f"{name}{suffix}")
    argv = json.dumps([[name, call, str(files[name])] for name, (_, call) in cases.items()])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, argv], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (files[name], results[name]) for name in cases}


def _refused(hostile, case: str, error: str, *needles: str) -> str:
    path, r = hostile[case]
    assert r["error"] == error, r
    assert str(path) in r["message"], r["message"]
    for needle in needles:
        assert needle in r["message"], (needle, r["message"])
    assert r["peak_mb"] < MEMORY_BOUND_MB, r
    return r["message"]


def test_bomb_files_are_small(hostile):
    assert hostile["bomb_small_tensor"][0].stat().st_size < 3 * MIB  # inflates to 2 GiB
    assert hostile["stride0_64gib"][0].stat().st_size < 1024  # views 64 GiB
    assert hostile["bomb_state"][0].stat().st_size < 3 * MIB


def test_zip_bomb_refused_before_inflating(hostile):
    """A member claiming 2 GiB from 2 MB is a bomb, whatever the pickle wants of it."""
    for case in ("bomb_small_tensor", "bomb_whole_tensor", "bomb_via_load"):
        _refused(hostile, case, "CheckpointError", "archive/data/0", "zip bomb")


def test_zip_member_lying_about_its_size_inflates_only_what_is_addressed(hostile):
    """The zip claims 64 bytes (with their CRC), the stream holds 2 GiB: 64 bytes are read."""
    path, r = hostile["bomb_claims_64_bytes"]
    assert r["error"] is None and r["value"] == {"x": [16]}, r
    assert r["peak_mb"] < MEMORY_BOUND_MB, r
    prefix = _bomb_stream()[3]
    np.testing.assert_array_equal(read_pth(path)["x"], np.frombuffer(prefix[:64], "<f4"))


def test_only_the_addressed_prefix_of_a_member_is_inflated(hostile):
    """400 MiB honestly compressed 90:1 (not a bomb) but only 64 bytes addressed: 64 read."""
    path, r = hostile["big_member_small_tensor"]
    assert path.stat().st_size < 6 * MIB
    assert r["error"] is None and r["value"] == {"x": [16]}, r
    assert r["peak_mb"] < MEMORY_BOUND_MB, r
    with zipfile.ZipFile(path) as zf:
        first = np.frombuffer(zf.open("archive/data/0").read(64), "<f4")
    np.testing.assert_array_equal(read_pth(path, mmap=False)["x"], first)


def test_pickle_declaring_more_than_the_member_is_refused_before_inflating(hostile):
    _refused(hostile, "bomb_pickle_wants_2gib", "CheckpointError", "archive/data/0",
             "holds 64 bytes but the pickle needs 2147483648")


def test_stride0_views_refused_before_allocating(hostile):
    for case, n in (("stride0_2gib", 23170), ("stride0_64gib", 131072)):
        msg = _refused(hostile, case, "CheckpointError", "tensor 'x'", "overlapping view",
                       f"({n}, {n})", "(0, 0)")
        assert "MemoryError" not in msg


def test_views_overlapping_each_other_are_bounded(hostile):
    """200 transposed views of one 4 MB storage would copy 800 MB: refused at the 5th."""
    _refused(hostile, "overlapping_copies", "CheckpointError", "tensor 't4'", "copies")


def test_state_zip_bomb_refused(hostile):
    _refused(hostile, "bomb_state", "StateError", "0.att_x_prev.npy", "zip bomb")


def test_verify_reports_a_bomb_without_inflating_it(hostile):
    problems = verify(hostile["bomb_small_tensor"][0])
    assert any("archive/data/0" in p and "zip bomb" in p for p in problems), problems


# ---------------------------------------------------------------------------- geometry, pth
def test_overlapping_and_stride0_geometries(tmp_path):
    """Self-overlapping views are refused; stride 0 on a size-1 dim and honest views pass."""
    storage = np.arange(24, dtype="<f4").tobytes()

    def load(size, stride, offset=0):
        path = _write_zip(tmp_path / "g.pth", {
            "archive/data.pkl": _pickle([("x", "0", 24, size, offset, stride)]),
            "archive/data/0": storage})
        return read_pth(path)["x"]

    for size, stride in (((4, 3), (2, 1)), ((3, 4), (4, 4)), ((2, 2, 2), (4, 1, 1)),
                         ((2, 5), (0, 1))):
        with pytest.raises(CheckpointError, match=r"tensor 'x' is an overlapping view"):
            load(size, stride)
    np.testing.assert_array_equal(load((1, 6), (0, 1)), np.arange(6).reshape(1, 6))
    # interleaved but disjoint: x[i, j, k] = storage[1 + 12i + j + 3k]
    idx = 1 + 12 * np.arange(2)[:, None, None] + np.arange(3)[:, None] + 3 * np.arange(2)
    np.testing.assert_array_equal(load((2, 3, 2), (12, 1, 3), offset=1), idx)
    with pytest.raises(CheckpointError, match=r"data.pkl is corrupt.*bad tensor geometry"):
        load((0, 1 << 62), (1, 1))


# ----------------------------------------------------------------------------- layer indices
@pytest.fixture(scope="module")
def tensors4(fixtures_dir) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in read_pth(fixtures_dir / FIXTURE4).items()}


@pytest.mark.timeout(60)
def test_huge_layer_index_named_not_built(tensors4, tmp_path):
    t = {**tensors4, "blocks.100000000.att.key.weight": np.zeros((128, 128), np.float32)}
    path = tmp_path / "layers.pth"
    write_pth(t, path)
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(path)
    msg = str(e.value)
    assert str(path) in msg and "blocks.100000000.att.key.weight" in msg
    assert "without gaps" in msg
    t = {**tensors4, "blocks." + "9" * 5000 + ".x": np.zeros(1, np.float32)}  # int() refuses
    with pytest.raises(CheckpointError, match=r"names layer 9{20}"):
        rwkv_jax.checkpoint.infer_config(t)


def test_layer_gap_named(tensors4):
    t = {k.replace("blocks.2.", "blocks.5."): v for k, v in tensors4.items()}
    with pytest.raises(CheckpointError, match=r"key 'blocks\.5\.[\w.]+' names layer 5, but "
                                              r"layers 2, 4 have no tensors"):
        rwkv_jax.checkpoint.infer_config(t)


# ---------------------------------------------------------------- FIFOs, sockets, devices
@pytest.mark.timeout(60)
def test_fifo_socket_device_refused_without_blocking(tmp_path, tensors4):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    for call in (rwkv_jax.load, read_tensors, read_pth):
        with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a regular "
                                                  r"file") as e:
            call(fifo)
        assert str(e.value).startswith(f"{fifo}: cannot ")
    assert verify(fifo) == [f"{fifo}: cannot read: is a FIFO (named pipe), not a regular file "
                            "or directory"]
    os.mkfifo(tmp_path / "state.npz")
    with pytest.raises(StateError, match=r"state\.npz: cannot read state file: is a FIFO"):
        load_state(tmp_path / "state.npz", _tiny_model())
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"run/model\.safetensors: cannot read: is a FIFO"):
        rwkv_jax.load(run)
    os.remove(run / "model.safetensors")
    write_pth(tensors4, run / "model.pth")
    os.mkfifo(run / "config.json")
    with pytest.raises(CheckpointError, match=r"run/config\.json: cannot read: is a FIFO"):
        rwkv_jax.load(run)
    sock_dir = tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths must be short
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(f"{sock_dir}/m.pth")
        try:
            with pytest.raises(CheckpointError, match=r"is a socket, not a regular file"):
                rwkv_jax.load(f"{sock_dir}/m.pth")
        finally:
            shutil.rmtree(sock_dir)
    if os.path.exists("/dev/zero"):
        with pytest.raises(CheckpointError, match=r"/dev/zero: .*is a character device"):
            rwkv_jax.load("/dev/zero")


# ----------------------------------------------------------------------- malformed shapes
@pytest.mark.parametrize("key, shape", [
    ("emb.weight", (256 * 128,)),  # 1-D
    ("emb.weight", ()),
    ("emb.weight", (256, 0)),
    ("blocks.0.ffn.key.weight", ()),
    ("blocks.0.ffn.key.weight", (0, 128)),
    ("blocks.1.att.time_decay", (128, 1)),  # wrong shape: the model check names it
])
def test_malformed_shapes_named(tensors4, tmp_path, key, shape):
    t = {**tensors4, key: np.zeros(shape, np.float32)}
    path = tmp_path / "m.pth"
    write_pth(t, path)
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(path)
    assert key in str(e.value) and str(path) in str(e.value), str(e.value)


@pytest.mark.parametrize("version, key, shape", [
    ("5.2", "blocks.0.att.time_faaaa", (2,)),
    ("7", "blocks.0.att.r_k", (8,)),
    ("6", "blocks.0.att.time_maa_w1", (8,)),
])
def test_malformed_inference_tensors_named(version, key, shape):
    t = rwkv_jax.checkpoint.model_tensors(_tiny_model(version, n_embd=64))
    t[key] = np.zeros(shape, np.float32)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \({shape[0]},\)"):
        rwkv_jax.checkpoint.model_from_tensors(t)


def test_integer_weights_refused(tensors4, tmp_path):
    t = {**tensors4, "blocks.1.att.key.weight": np.zeros((128, 128), np.int32)}
    write_pth(t, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight: dtype int32, "
                                              r"expected a float dtype"):
        rwkv_jax.load(tmp_path / "int.pth")


# ------------------------------------------------------------------------------ safetensors
def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_safetensors_float8_refused_by_name(tmp_path, dtype):
    path = _safetensors(tmp_path / "f8.safetensors",
                        {"emb.weight": _entry(), "blocks.0.att.key.weight":
                         _entry(dtype, (4, 4), (8, 24))}, bytes(24))
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(path)
    assert str(path) in str(e.value)
    assert f"tensor 'blocks.0.att.key.weight' has dtype {dtype} (float8)" in str(e.value)


@pytest.mark.parametrize("header, data, length, needle", [
    (b"{not json", b"", None, "header is not JSON"),
    (b"{\xff}", b"", None, "header is not JSON"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"", None, "tensor 'w': header entry must have"),
    ({"w": _entry("Q8")}, bytes(8), None, "tensor 'w' has unknown dtype 'Q8'"),
    ({"w": _entry(shape=[-2])}, bytes(8), None, "tensor 'w' has malformed shape [-2]"),
    ({"w": _entry(shape=[True, 2])}, bytes(8), None, "tensor 'w' has malformed shape"),
    ({"w": _entry(offsets=[8, 0])}, bytes(8), None, "tensor 'w' has malformed data_offsets"),
    ({"w": _entry(shape=(3,))}, bytes(8), None, "tensor 'w': shape [3] of F32 needs 12 bytes"),
    ({"a": _entry(), "w": _entry(offsets=(4, 12))}, bytes(12), None,
     "tensor 'w' data_offsets [4, 12] overlap the previous tensor"),
    ({"a": _entry(), "w": _entry(offsets=(12, 20))}, bytes(20), None,
     "tensor 'w' data_offsets [12, 20] leave a gap"),
    ({"w": _entry(shape=(4,), offsets=(0, 16))}, bytes(8), None, "truncated"),
    ({"w": _entry()}, bytes(8), 1 << 29, "header length 536870912 exceeds the file"),
    ({"w": _entry()}, bytes(12), None, "extra bytes"),
    (b'{"w": ' + json.dumps(_entry()).encode() + b', "w": ' + json.dumps(_entry()).encode()
     + b"}", bytes(8), None, "header names 'w' twice"),
    ({"__metadata__": {"a": 1}, "w": _entry()}, bytes(8), None, "__metadata__ must map"),
])
def test_safetensors_malformed_header(tmp_path, header, data, length, needle):
    path = _safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as e:
        read_tensors(path)
    assert str(path) in str(e.value) and ".safetensors" in str(e.value)
    assert needle in str(e.value), str(e.value)
    assert verify(path) == [str(e.value)]


def test_safetensors_header_not_an_object(tmp_path):
    from rwkv_jax.io.safetensors import read_safetensors
    path = _safetensors(tmp_path / "list.safetensors", [1, 2])
    with pytest.raises(CheckpointError, match=r"list\.safetensors: .*header is a JSON list"):
        read_safetensors(path)
    with pytest.raises(CheckpointError, match=r"not an RWKV checkpoint"):  # sniffed first
        read_tensors(path)


def test_safetensors_dtypes_and_mmap(tmp_path):
    """Every supported dtype reads back (bf16 included) and tensors are copy-on-write maps."""
    from safetensors.numpy import save_file
    want = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.ones(3, np.float16),
            "f64": np.arange(2.0), "i64": np.arange(-2, 2), "u8": np.arange(4, dtype=np.uint8),
            "b": np.array([True, False]), "e": np.zeros((0, 2), np.float32)}
    save_file(want, str(tmp_path / "a.safetensors"))
    got = read_tensors(tmp_path / "a.safetensors")
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        np.testing.assert_array_equal(got[k], w)
    assert not got["f32"].flags.owndata and got["f32"].flags.writeable
    before = (tmp_path / "a.safetensors").read_bytes()
    got["f32"][:] = 7
    assert (tmp_path / "a.safetensors").read_bytes() == before
    bf = np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = _safetensors(tmp_path / "bf.safetensors", {"w": _entry("BF16", (4,), (0, 8))},
                        bf.tobytes())
    np.testing.assert_array_equal(read_tensors(path)["w"], bf)


# ------------------------------------------------------------------------------ permissions
@contextlib.contextmanager
def _unprivileged():
    """Run the body with an ordinary user's permissions (tests may run as root)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(65534)
        os.seteuid(65534)
    except PermissionError:
        os.setegid(0)
        pytest.skip("running as root without the right to drop privileges")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_dir():
    """A directory anyone may traverse (pytest's tmp_path is private to its owner)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="rwkv-jax-perm-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


def test_unreadable_files_named(open_dir, tensors4):
    model = _tiny_model()
    pth = open_dir / "m.pth"
    write_pth(tensors4, pth)
    st = _safetensors(open_dir / "m.safetensors", {"w": _entry()}, bytes(8))
    state = save_state(open_dir / "s.npz", model.init_state(1), model)
    state_st = save_state(open_dir / "s.safetensors", model.init_state(1), model)
    run = open_dir / "run"
    run.mkdir()
    write_pth(tensors4, run / "model.pth")
    (run / "config.json").write_text("{}")
    locked_run = open_dir / "locked"
    locked_run.mkdir()
    for p in (pth, st, state, state_st, run / "config.json"):
        p.chmod(0)
    locked_run.chmod(0)
    with _unprivileged():
        for p in (pth, st):
            with pytest.raises(CheckpointError, match="Permission denied") as e:
                rwkv_jax.load(p)
            assert str(e.value).startswith(f"{p}: cannot ")
            assert any("Permission denied" in x for x in verify(p))
        for p in (state, state_st):
            with pytest.raises(StateError, match="Permission denied") as e:
                load_state(p, model)
            assert str(e.value).startswith(f"{p}: cannot read")
        with pytest.raises(CheckpointError, match="Permission denied") as e:
            rwkv_jax.load(run)
        assert str(e.value).startswith(f"{run / 'config.json'}: cannot read")
        with pytest.raises(CheckpointError, match="Permission denied") as e:
            rwkv_jax.load(locked_run)
        assert str(locked_run) in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"ln_x_eps": "small"}', "'ln_x_eps' must be a positive number, got 'small'"),
    ('{"head_size": 6.5}', "'head_size' must be a positive integer, got 6.5"),
    ('{"ln_eps": -1}', "'ln_eps' must be a positive number, got -1"),
    ('{"chunk_size": true}', "'chunk_size' must be a positive integer, got True"),
])
def test_run_directory_config_json_malformed(tmp_path, tensors4, text, needle):
    write_pth(tensors4, tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        rwkv_jax.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ")
    assert needle in str(e.value)
    assert any("config.json" in p and needle in p for p in verify(tmp_path))


def test_run_directory_config_json_kept_fields_used(tmp_path, tensors4):
    write_pth(tensors4, tmp_path / "model.pth")
    (tmp_path / "config.json").write_text('{"ln_eps": 2e-5, "chunk_size": null, "x": [1]}')
    assert rwkv_jax.load(tmp_path).config.ln_eps == 2e-5


# ------------------------------------------------------------------------------- non-finite
def test_nonfinite_weights_refused_unless_allowed(tensors4, tmp_path):
    t = dict(tensors4)
    keys = list(t)
    for k in keys[3:10]:  # seven bad tensors: the message names the first five
        t[k] = t[k].copy()
        t[k].reshape(-1)[:2] = [np.nan, np.inf]
    t[keys[3]].reshape(-1)[:] = np.nan
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"nan{suffix}"
        if suffix == ".pth":
            write_pth(t, path)
        else:
            from safetensors.numpy import save_file
            save_file(t, str(path))
        with pytest.raises(CheckpointError) as e:
            rwkv_jax.load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: 7 tensors hold NaN/inf values: '")
        assert msg.count("' (") == 5 and "and 2 more" in msg and "allow_nonfinite=True" in msg
        if suffix == ".pth":  # in file order
            n = t[keys[3]].size
            assert f"'{keys[3]}' ({n} of {n}), '{keys[4]}' (2 of " in msg
            assert f"'{keys[7]}'" in msg and f"'{keys[8]}'" not in msg
        assert any("7 tensors hold NaN/inf" in p for p in verify(path))
    model = rwkv_jax.load(path, allow_nonfinite=True)
    loaded = rwkv_jax.checkpoint.model_tensors(model)[keys[3]]
    assert np.isnan(loaded).all()
    bf = {**tensors4, "emb.weight": tensors4["emb.weight"].astype(ml_dtypes.bfloat16)}
    bf["emb.weight"][5, 7] = -np.inf
    write_pth(bf, tmp_path / "bf.pth")
    with pytest.raises(CheckpointError, match=r"1 tensor holds NaN/inf values: 'emb.weight' "
                                              r"\(1 of 32768\)"):
        rwkv_jax.load(tmp_path / "bf.pth")


# -------------------------------------------------------------------------------------- CRC
def _flip_in_storage(src: pathlib.Path, dst: pathlib.Path, tensor_bytes: int = 0) -> str:
    """Copy ``src`` to ``dst`` with the lowest mantissa bit of the first float of the first
    storage flipped (the value stays finite and plausible); return that member's name."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size)
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + tensor_bytes] ^= 0x01
    dst.write_bytes(bytes(raw))
    return info.filename


def test_flipped_byte_caught_by_verify(fixtures_dir, tmp_path):
    src = fixtures_dir / FIXTURE4
    path = tmp_path / "flipped.pth"
    member = _flip_in_storage(src, path)
    assert verify(src) == []
    silent = read_pth(path)  # the mapped fast path reads no CRC: documented
    assert all(np.isfinite(v).all() for v in silent.values())
    for call in (lambda: read_pth(path, verify=True), lambda: read_pth(path, mmap=False),
                 lambda: rwkv_jax.load(path, verify=True),
                 lambda: read_tensors(path, verify=True)):
        with pytest.raises(CheckpointError) as e:
            call()
        assert str(path) in str(e.value) and member in str(e.value)
        assert "CRC" in str(e.value)
    problems = verify(path)
    assert len(problems) == 1 and member in problems[0] and "CRC" in problems[0], problems


def test_verify_clean_files(fixtures_dir, tmp_path):
    model = rwkv_jax.load(fixtures_dir / FIXTURE4)
    for name in ("m.safetensors", "m.pth"):
        assert verify(rwkv_jax.save(model, tmp_path / name)) == []
    assert verify(tmp_path / "absent.pth") == [f"{tmp_path / 'absent.pth'}: no such file"]
    t = rwkv_jax.checkpoint.model_tensors(model)
    del t["ln_out.bias"]
    write_pth(t, tmp_path / "short.pth")
    assert verify(tmp_path / "short.pth") == [
        f"{tmp_path / 'short.pth'}: checkpoint does not match an RWKV-4 model (L4 C128 V256):"
        "\n  missing keys: ln_out.bias"]


# ------------------------------------------------------------------------------ state files
@pytest.fixture(scope="module")
def state_model():
    return _tiny_model()


def _state_npz(path: pathlib.Path, header, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    raw = header if isinstance(header, str) else json.dumps(header)
    with open(path, "wb") as f:
        np.savez(f, __header__=np.array(raw), **arrays)
    return path


def _good(model, batch=1):
    header = {"format": "rwkv-jax-state", "format_version": 1, "rwkv_version": "4",
              "n_layer": 1, "n_embd": 8, "batch_size": batch}
    return header, state_arrays(model.init_state(batch))


@pytest.mark.parametrize("change, needle", [
    ("{not json", "bad state header: not JSON"),
    ("[1, 2]", "bad state header: a JSON list, not an object"),
    ({"format_version": "1"}, "state format version '1'"),
    ({"format_version": True}, "state format version True"),
    ({"n_layer": "1"}, "'n_layer' must be a positive integer, got '1'"),
    ({"batch_size": 0}, "'batch_size' must be a positive integer, got 0"),
    ({"batch_size": 1.0}, "'batch_size' must be a positive integer, got 1.0"),
    ({"rwkv_version": 4}, "'rwkv_version' must be a string, got 4"),
    ({"n_embd": None}, "'n_embd' must be a positive integer, got None"),
    ({"head_size": [64]}, "'head_size' must be a positive integer, got [64]"),
    ({"format": "npz"}, "not an rwkv-jax state file (format 'npz')"),
])
def test_state_header_malformed(state_model, tmp_path, change, needle):
    header, arrays = _good(state_model)
    header = change if isinstance(change, str) else {**header, **change}
    path = _state_npz(tmp_path / "s.npz", header, arrays)
    with pytest.raises(StateError) as e:
        load_state(path, state_model)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)


def test_state_header_missing_field_and_odd_header_array(state_model, tmp_path):
    header, arrays = _good(state_model)
    del header["n_embd"]
    with pytest.raises(StateError, match=r"bad state header:\n  'n_embd' is missing"):
        load_state(_state_npz(tmp_path / "a.npz", header, arrays), state_model)
    np.savez(tmp_path / "b.npz", __header__=np.zeros(3), **arrays)
    with pytest.raises(StateError, match=r"b\.npz: bad state header: '__header__' is a float64"):
        load_state(tmp_path / "b.npz", state_model)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_state_nonfinite_refused(state_model, tmp_path, suffix, value):
    state = jax.tree.map(lambda x: np.full(np.shape(x), value, np.float32),
                         state_model.init_state(1))
    path = save_state(tmp_path / f"s{suffix}", state, state_model)
    with pytest.raises(StateError) as e:
        load_state(path, state_model)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 5 state arrays hold NaN/inf values: '0.att_x_prev' "
                          "(8 of 8)"), msg


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_, "<U3"])
def test_state_wrong_dtypes(state_model, tmp_path, dtype):
    header, arrays = _good(state_model)
    arrays["0.wkv.bb"] = np.zeros((1, 8), dtype)
    path = _state_npz(tmp_path / "s.npz", header, arrays)
    with pytest.raises(StateError, match=rf"s\.npz: state arrays must be floats:\n  0\.wkv\.bb:"
                                         rf" dtype {np.dtype(dtype)}"):
        load_state(path, state_model)


def test_state_float64_accepted(state_model, tmp_path):
    """A hand-made state in numpy's default float64 loads (as float32)."""
    header, arrays = _good(state_model)
    arrays = {k: np.full(v.shape, 0.5) for k, v in arrays.items()}
    state = load_state(_state_npz(tmp_path / "s.npz", header, arrays), state_model)
    assert state[0].att_x_prev.dtype == np.float32 and float(state[0].att_x_prev[0, 0]) == 0.5


def test_state_object_array_never_unpickled(state_model, tmp_path):
    header, arrays = _good(state_model)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    arrays["0.wkv.aa"] = np.array([Evil()], dtype=object)
    with open(tmp_path / "s.npz", "wb") as f:
        np.savez(f, __header__=np.array(json.dumps(header)), allow_pickle=True, **arrays)
    with pytest.raises(StateError, match=r"member '0\.wkv\.aa\.npy' holds Python objects"):
        load_state(tmp_path / "s.npz", state_model)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_state_truncated(state_model, tmp_path, suffix):
    path = save_state(tmp_path / f"s{suffix}", state_model.init_state(2), state_model)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 3, 5):
        path.write_bytes(raw[:cut])
        with pytest.raises(StateError) as e:
            load_state(path, state_model)
        assert str(e.value).startswith(f"{path}: "), str(e.value)
        assert "not a readable" in str(e.value) or "truncated" in str(e.value), str(e.value)


def test_state_npz_member_truncated_inside(state_model, tmp_path):
    """The zip directory is intact but a member's .npy data is shorter than its header says."""
    header, arrays = _good(state_model)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arrays["0.wkv.pp"])
    cut = buf.getvalue()[:-8]
    h = io.BytesIO()
    np.lib.format.write_array(h, np.array(json.dumps(header)))
    members = {"__header__.npy": h.getvalue(), "0.wkv.pp.npy": cut}
    for k, v in arrays.items():
        if k != "0.wkv.pp":
            b = io.BytesIO()
            np.lib.format.write_array(b, v)
            members[f"{k}.npy"] = b.getvalue()
    path = _write_zip(tmp_path / "s.npz", members)
    with pytest.raises(StateError, match=r"s\.npz: member '0\.wkv\.pp\.npy' is truncated"):
        load_state(path, state_model)


def test_state_directory_refused(state_model, tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(StateError, match=r"d\.npz: is a directory, not a state file"):
        load_state(tmp_path / "d.npz", state_model)
    assert stat.S_ISDIR((tmp_path / "d.npz").stat().st_mode)
