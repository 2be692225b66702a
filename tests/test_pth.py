"""The torch-free .pth reader/writer: real fixtures, round trips, hostile and broken files."""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from rwkv_jax.io.pth import CheckpointError, _PickleEmitter, read_pth, write_pth

FIXTURE_FILES = [
    "rwkv4-tiny-660k.pth",
    "rwkv5.1-tiny-730k.pth",
    "rwkv5.2-tiny-730k.pth",
    "rwkv6-tiny-3m.pth",
    "rwkv7-tiny-834k.pth",
]


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "bf16": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.array([[1, -2], [3, 2**31 - 1]], np.int32),
        "i16": np.array([-(2**15), 7], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.arange(256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "scalar_bf16": np.array(-1.5, ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "empty_1d": np.zeros((0,), np.int64),
        "transposed": base.T,
        "strided": base[1::2, ::3],
        "reversed": base[::-1],
        "big_endian": np.arange(5, dtype=">f4"),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, k
        assert g.dtype == w.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(g, w, err_msg=k)


def _write_zip(path: pathlib.Path, records: dict[str, bytes], prefix: str = "archive") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(f"{prefix}/{name}", data)


def _one_tensor_pickle(numel: int, shape, offset: int = 0, stride=None) -> bytes:
    """data.pkl of ``{'x': float32 tensor on storage '0'}`` with the given geometry."""
    em = _PickleEmitter()
    em.op(pickle.EMPTY_DICT)
    em.text("x")
    em.tensor("0", "FloatStorage", numel, tuple(shape), offset, stride)
    em.op(pickle.SETITEM)
    em.op(pickle.STOP)
    return bytes(em.out)


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.fixtures
def test_reads_rwkv4_fixture(fixtures_dir):
    sd = read_pth(fixtures_dir / "rwkv4-tiny-660k.pth")
    assert sd["emb.weight"].shape == (256, 128)
    assert sd["emb.weight"].dtype == np.float32
    assert sd["blocks.0.att.time_decay"].shape == (128,)
    assert sd["head.weight"].shape == (256, 128)
    assert all(type(v) is np.ndarray for v in sd.values())  # no memmap subclass leaks out
    assert np.isfinite(sd["emb.weight"]).all() and np.abs(sd["emb.weight"]).max() > 0


@pytest.mark.fixtures
@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_reads_every_fixture_mmap_and_not(fixtures_dir, name):
    mapped = read_pth(fixtures_dir / name)
    loaded = read_pth(fixtures_dir / name, mmap=False)
    assert len(mapped) > 10 and "emb.weight" in mapped
    _assert_same(mapped, loaded)


@pytest.mark.fixtures
def test_mapped_arrays_are_copy_on_write(fixtures_dir, tmp_path):
    path = tmp_path / "copy.pth"
    path.write_bytes((fixtures_dir / "rwkv4-tiny-660k.pth").read_bytes())
    before = path.read_bytes()
    sd = read_pth(path)
    sd["emb.weight"][:] = 0.0
    assert path.read_bytes() == before


@pytest.mark.fixtures
def test_fixture_survives_write_read(fixtures_dir, tmp_path):
    sd = read_pth(fixtures_dir / "rwkv7-tiny-834k.pth")
    write_pth(sd, tmp_path / "again.pth")
    _assert_same(read_pth(tmp_path / "again.pth"), sd)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_dtypes_shapes_strides(tmp_path, mmap):
    tensors = _sample_tensors()
    write_pth(tensors, tmp_path / "t.pth")
    got = read_pth(tmp_path / "t.pth", mmap=mmap)
    _assert_same(got, tensors)
    assert all(v.flags.writeable for v in got.values())


def test_round_trip_empty_state_dict(tmp_path):
    write_pth({}, tmp_path / "empty.pth")
    assert read_pth(tmp_path / "empty.pth") == {}


def test_writer_layout_matches_torch(tmp_path):
    """Records under archive/, stored uncompressed, every storage 64-byte aligned."""
    path = tmp_path / "t.pth"
    write_pth(_sample_tensors(), path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names[0] == "archive/data.pkl"
        assert zf.read("archive/byteorder") == b"little"
        assert zf.read("archive/version") == b"3\n"
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0, info.filename
    assert sum(n.startswith("archive/data/") for n in names) == len(_sample_tensors())
    assert not list(tmp_path.glob("*.tmp*"))


def test_reader_handles_offset_and_strides(tmp_path):
    """A view into a larger storage (as torch saves views): offset + non-contiguous stride."""
    storage = np.arange(24, dtype="<f4")
    path = tmp_path / "view.pth"
    _write_zip(path, {
        "data.pkl": _one_tensor_pickle(24, (4, 3), offset=1, stride=(6, 2)),
        "data/0": storage.tobytes(),
    })
    for mmap in (True, False):
        x = read_pth(path, mmap=mmap)["x"]
        np.testing.assert_array_equal(x, storage.reshape(4, 6)[:, 1::2])


def test_reader_honours_big_endian_byteorder(tmp_path):
    path = tmp_path / "big.pth"
    _write_zip(path, {
        "data.pkl": _one_tensor_pickle(6, (2, 3)),
        "byteorder": b"big",
        "data/0": np.arange(6, dtype=">f4").tobytes(),
    })
    x = read_pth(path)["x"]
    assert x.dtype == np.float32 and x.dtype.isnative
    np.testing.assert_array_equal(x, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_reader_unwraps_state_dict_wrapper(tmp_path):
    tensors = {"w": np.ones((2, 2), np.float32)}
    write_pth(tensors, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zf:
        inner = zf.read("archive/data.pkl")[2:-1]  # drop PROTO 2 and STOP
        storage = zf.read("archive/data/0")
    wrapped = (
        b"\x80\x02}(X\x0a\x00\x00\x00state_dict" + inner + b"X\x05\x00\x00\x00epochK\x03u."
    )
    _write_zip(tmp_path / "wrapped.pth", {"data.pkl": wrapped, "data/0": storage})
    _assert_same(read_pth(tmp_path / "wrapped.pth"), tensors)


@pytest.mark.parametrize(
    "obj, detail",
    [([1, 2], "list"), ({"epoch": 3}, "'epoch'"), ({1: 2}, "1")],
)
def test_not_a_state_dict(tmp_path, obj, detail):
    path = tmp_path / "odd.pth"
    _write_zip(path, {"data.pkl": pickle.dumps(obj, protocol=2)})
    with pytest.raises(CheckpointError, match="not a state dict") as e:
        read_pth(path)
    assert detail in str(e.value) and str(path) in str(e.value)


def test_writer_rejects_unsupported_input(tmp_path):
    with pytest.raises(CheckpointError, match="complex64"):
        write_pth({"c": np.zeros(2, np.complex64)}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="names must be str"):
        write_pth({3: np.zeros(2, np.float32)}, tmp_path / "n.pth")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- hostile


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile_cases(marker: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """name -> (data.pkl that would create ``marker``, the global the error must name)."""
    cmd = f"touch {marker}"
    system = f"{os.system.__module__}.system"  # posix.system on Linux

    def dumps(fn, args, protocol=2):
        return pickle.dumps(_Evil(fn, args), protocol=protocol, fix_imports=False)

    return {
        "os.system": (dumps(os.system, (cmd,)), system),
        "os.system/proto4": (dumps(os.system, (cmd,), protocol=4), system),  # STACK_GLOBAL
        "os.system/proto0": (f"cos\nsystem\n(V{cmd}\ntR.".encode(), "os.system"),
        "builtins.eval": (dumps(eval, (f"__import__('os').system('{cmd}')",)), "builtins.eval"),
        "__builtin__.eval": (
            f"c__builtin__\neval\n(V__import__('os').system('{cmd}')\ntR.".encode(),
            "__builtin__.eval",
        ),
        "subprocess.Popen": (
            dumps(subprocess.Popen, (["touch", str(marker)],)),
            "subprocess.Popen",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["os.system", "os.system/proto4", "os.system/proto0", "builtins.eval", "__builtin__.eval",
     "subprocess.Popen"],
)
def test_hostile_pickle_is_refused_before_running(tmp_path, case):
    marker = tmp_path / "pwned"
    pkl, refused = _hostile_cases(marker)[case]
    candidates = [pkl]
    if pkl.startswith(b"\x80\x02"):
        # Also hidden as a value inside a valid state dict, after a real tensor.
        valid = _one_tensor_pickle(2, (2,))[:-2]  # drop SETITEM and STOP
        candidates.append(valid + b"X\x04\x00\x00\x00evil" + pkl[2:-1] + b"u.")
    for data_pkl in candidates:
        path = tmp_path / "evil.pth"
        _write_zip(path, {"data.pkl": data_pkl, "data/0": np.zeros(2, np.float32).tobytes()})
        with pytest.raises(CheckpointError, match="refused global") as e:
            read_pth(path)
        assert f"'{refused}'" in str(e.value) and str(path) in str(e.value)
        assert not marker.exists()


def test_stand_ins_cannot_be_called_or_mutated(tmp_path, fixtures_dir):
    path = tmp_path / "odd.pth"
    # REDUCE on a storage type stand-in: torch.FloatStorage() is not callable here.
    _write_zip(path, {"data.pkl": b"\x80\x02ctorch\nFloatStorage\n)R."})
    with pytest.raises(CheckpointError, match="corrupt or not a tensor checkpoint"):
        read_pth(path)
    # BUILD onto the shared stand-in (state (None, {'dtype': 'x'})) must not change it.
    _write_zip(path, {"data.pkl": b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX"
                                  b"\x01\x00\x00\x00xs\x86b."})
    with pytest.raises(CheckpointError, match="BUILD"):
        read_pth(path)
    assert read_pth(fixtures_dir / "rwkv4-tiny-660k.pth")["emb.weight"].dtype == np.float32


# ----------------------------------------------------------------------------- broken files


@pytest.mark.fixtures
@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_fixture(fixtures_dir, tmp_path, mmap):
    raw = (fixtures_dir / "rwkv4-tiny-660k.pth").read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_pth(path, mmap=mmap)
    assert str(path) in str(e.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(CheckpointError, match="not a zip-format PyTorch checkpoint"):
        read_pth(path)


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_pth(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="cannot open") as e:
        read_pth(tmp_path / "absent.pth")
    assert "absent.pth" in str(e.value)


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "legacy.pth"
    # What torch.save(..., _use_new_zipfile_serialization=False) starts with: the magic number.
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\0" * 64)
    with pytest.raises(CheckpointError, match="legacy"):
        read_pth(path)


def test_safetensors_passed_by_mistake(tmp_path):
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_pth(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "nopkl.pth"
    _write_zip(path, {"version": b"3\n", "data/0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_pth(path)


@pytest.mark.parametrize("mmap", [True, False])
def test_storage_shorter_than_declared(tmp_path, mmap):
    path = tmp_path / "short.pth"
    _write_zip(path, {"data.pkl": _one_tensor_pickle(6, (2, 3)), "data/0": b"\0" * 12})
    with pytest.raises(CheckpointError, match=r"truncated/corrupt.*holds 12 bytes.*needs 24"):
        read_pth(path, mmap=mmap)


def test_tensor_larger_than_its_storage(tmp_path):
    path = tmp_path / "overrun.pth"
    _write_zip(path, {"data.pkl": _one_tensor_pickle(4, (2, 3)), "data/0": b"\0" * 16})
    with pytest.raises(CheckpointError, match=r"tensor 'x' needs 6 elements.*holds 4"):
        read_pth(path)


def test_missing_storage_record(tmp_path):
    path = tmp_path / "nostorage.pth"
    _write_zip(path, {"data.pkl": _one_tensor_pickle(4, (4,))})
    with pytest.raises(CheckpointError, match="archive/data/0' is missing"):
        read_pth(path)


def test_corrupt_storage_fails_crc(tmp_path):
    path = tmp_path / "crc.pth"
    write_pth({"x": np.arange(64, dtype=np.float32)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated/corrupt.*CRC"):
        read_pth(path, mmap=False)


def test_garbage_pickle(tmp_path):
    path = tmp_path / "garbage.pth"
    _write_zip(path, {"data.pkl": b"\x80\x02}(Xzzz"})
    with pytest.raises(CheckpointError, match="data.pkl is corrupt"):
        read_pth(path)


# ----------------------------------------------------------------------------- torch


@pytest.mark.torch
def test_torch_loads_what_we_write(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (only for cross-checks)")
    tensors = _sample_tensors()
    path = tmp_path / "ours.pth"
    write_pth(tensors, path)
    for mmap in (False, True):
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        assert list(loaded) == list(tensors)
        for k, want in tensors.items():
            got = loaded[k]
            assert tuple(got.shape) == want.shape, k
            if want.dtype == ml_dtypes.bfloat16:
                assert got.dtype == torch.bfloat16
                got_np = got.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                got_np = got.numpy()
            assert got_np.dtype == want.dtype.newbyteorder("="), k
            np.testing.assert_array_equal(got_np, want, err_msg=k)


@pytest.mark.torch
def test_we_read_what_torch_writes(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (only for cross-checks)")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    module = torch.nn.Linear(3, 2)
    saved = {
        "f32": torch.randn(3, 4, generator=gen),
        "bf16": torch.randn(5, 2, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(4, generator=gen).half(),
        "f64": torch.randn(2, 2, generator=gen).double(),
        "i64": torch.arange(-4, 4),
        "i32": torch.tensor([1, -2], dtype=torch.int32),
        "i16": torch.tensor([3, -4], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "view": base[1::2, 2:7:2],  # offset + non-contiguous strides into a shared storage
        "row": base[3],  # same storage as "view"
        "transposed": base.t(),
        "param": torch.nn.Parameter(torch.ones(2)),
    }

    def as_numpy(t):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    torch.save(saved, tmp_path / "torch.pth")
    torch.save({"state_dict": module.state_dict(), "step": 7}, tmp_path / "wrapped.pth")
    for mmap in (True, False):
        ours = read_pth(tmp_path / "torch.pth", mmap=mmap)
        _assert_same(ours, {k: as_numpy(v) for k, v in saved.items()})
        wrapped = read_pth(tmp_path / "wrapped.pth", mmap=mmap)
        _assert_same(wrapped, {k: as_numpy(v) for k, v in module.state_dict().items()})

    torch.save(saved, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        read_pth(tmp_path / "legacy.pth")
