"""rwkv_jax.data.jsonl.read_jsonl: the one jsonl reader and its one error policy."""

from __future__ import annotations

import json
import warnings

import pytest

from rwkv_jax.data import DataError, TornLineError, read_jsonl


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_reads_values_with_line_numbers_skipping_blank_lines(tmp_path):
    p = _write(tmp_path / "a.jsonl",
               b'\xef\xbb\xbf{"a": 1}\n\n   \r\n[2, 3]\r\n"s\xc3\xa9"\n{"last": true}')
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, [2, 3]), (5, "sé"), (6, {"last": True})]
    assert list(read_jsonl(_write(tmp_path / "empty.jsonl", b""))) == []


def test_a_string_with_unicode_line_separators_stays_one_line(tmp_path):
    obj = {"text": "a\u2028b\u0085c\rd"}  # not JSON line breaks; text mode would split at \r
    p = _write(tmp_path / "u.jsonl", (json.dumps(obj, ensure_ascii=False) + "\n").encode())
    assert list(read_jsonl(p)) == [(1, obj)]


@pytest.mark.parametrize("bad,why", [(b'{"a": 1', "not valid JSON"),
                                     (b"\xff\xfe{}", "not UTF-8")])
def test_malformed_line_names_path_and_line(tmp_path, bad, why):
    p = _write(tmp_path / "bad.jsonl", b'{"ok": 1}\n\n' + bad + b'\n{"ok": 2}\n')
    it = read_jsonl(p)
    assert next(it) == (1, {"ok": 1})
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {why}") as e:
        next(it)
    assert not isinstance(e.value, TornLineError)  # it has a newline: not torn, just bad


@pytest.mark.parametrize("torn", [b'{"step": 3, "lo', b'{"s": "\xc3'])
def test_torn_last_line_is_its_own_error_or_dropped_with_a_warning(tmp_path, torn):
    p = _write(tmp_path / "metrics.jsonl", b'{"step": 1}\n{"step": 2}\n' + torn)
    with pytest.raises(TornLineError, match=r"metrics\.jsonl:3: incomplete last line") as e:
        list(read_jsonl(p))
    assert e.value.lineno == 3 and e.value.path == p and isinstance(e.value, DataError)
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: incomplete last line.*dropped"):
        assert list(read_jsonl(p, drop_torn_last=True)) == [(1, {"step": 1}), (2, {"step": 2})]


def test_a_complete_last_line_without_newline_is_fine(tmp_path):
    p = _write(tmp_path / "m.jsonl", b'{"step": 1}\n{"step": 2}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [v for _, v in read_jsonl(p, drop_torn_last=True)] == [{"step": 1}, {"step": 2}]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
