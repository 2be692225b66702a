"""Bad input to ``rwkv-jax``: one line ``rwkv-jax CMD: error: ...`` on stderr, exit status 2,
no traceback, before any work (no model load, no data read, nothing written)."""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

from rwkv_jax.cli import main
from rwkv_jax.cli import info as info_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a file that exists but is no checkpoint: a command that got as far as loading it would fail
# with "not an RWKV checkpoint", so the expected messages below also prove the order
NOT_A_MODEL = str(ROOT / "README.md")


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"rwkv-jax {command}: error: "), err
    return err


GEN = ["generate", "--model", NOT_A_MODEL, "--prompt", "a"]
EVAL = ["eval", "--model", NOT_A_MODEL, "--data", NOT_A_MODEL]


@pytest.mark.parametrize("argv, message", [
    (EVAL + ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (EVAL + ["--ctx-len", "0"], "argument --ctx-len: must be >= 1, got 0"),
    (EVAL + ["--lambada-prefix", "abc"],
     "argument --lambada-prefix: expected auto, none or comma-separated token ids, got 'abc'"),
    (EVAL + ["--lambada-prefix", "0,-1"], "token ids must be >= 0"),
    (GEN + ["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (GEN + ["--temperature", "-0.5"], "argument --temperature: temperature must be >= 0"),
    (GEN + ["--top-p", "0"], "argument --top-p: top_p must be in (0, 1], got 0"),
    (GEN + ["--top-p", "1.5"], "argument --top-p: top_p must be in (0, 1], got 1.5"),
    (GEN + ["--top-k", "-1"], "argument --top-k: top_k must be >= 0, got -1"),
    (GEN + ["--max-tokens", "-1"], "argument --max-tokens: must be >= 0, got -1"),
    (GEN + ["--penalty-decay", "2"], "argument --penalty-decay: penalty_decay must be in [0, 1]"),
    (GEN + ["--presence-penalty", "inf"], "argument --presence-penalty: must be a finite"),
    (GEN + ["--ban", "x"], "argument --ban: expected an integer, got 'x'"),
    (GEN + ["--ln-x-eps", "0"], "argument --ln-x-eps: must be > 0"),
    (GEN + ["--state-in", "/nonexistent/s.npz"],
     "argument --state-in: /nonexistent/s.npz: no such file or directory"),
    (["generate", "--model", "/nonexistent/m.pth", "--prompt", "a"],
     "argument --model: /nonexistent/m.pth: no such file or directory"),
    (["generate", "--model", NOT_A_MODEL + "/x.pth", "--prompt", "a"],
     "a parent is not a directory"),
    (["eval", "--model", NOT_A_MODEL, "--data", str(ROOT)], "is a directory, expected a file"),
    (["prepare", NOT_A_MODEL, "--out", "/nonexistent/x", "--tokenizer", "bytes",
      "--doc-separator", "x"], "argument --doc-separator: expected auto, none or a token id"),
    (["info", "/nonexistent.pth"], "argument model: /nonexistent.pth: no such file"),
    (["generate", "--model", NOT_A_MODEL], "the following arguments are required: --prompt"),
])
def test_bad_option_value_is_one_line_before_loading(argv, message, capsys):
    assert main(argv) == 2
    err = _one_error_line(capsys, argv[0])
    assert message in err, err


def test_unknown_command_is_one_line(capsys):
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkv-jax: error: argument COMMAND: invalid choice: 'bogus'")
    assert err.count("\n") == 1


def test_model_fifo_does_not_block(tmp_path, capsys):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)  # opening it for reading would wait forever for a writer
    assert main(["generate", "--model", str(fifo), "--prompt", "a"]) == 2
    assert "not a regular file or directory" in _one_error_line(capsys, "generate")
    assert main(["eval", "--model", NOT_A_MODEL, "--data", str(fifo)]) == 2
    assert "not a regular file" in _one_error_line(capsys, "eval")


@pytest.mark.parametrize("output, message", [
    ("x.bin", "unknown output suffix '.bin'"),
    ("README.md/x.pth", "README.md is not a directory"),
    ("README.md/run", "README.md is not a directory"),
    ("README.md", "exists and is not a directory"),
    ("tests.pth", "is a directory; a .pth output must be a file"),
])
def test_convert_bad_output_before_loading(output, message, tmp_path, capsys):
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "tests.pth").mkdir()
    assert main(["convert", NOT_A_MODEL, str(tmp_path / output), "-q"]) == 2
    assert message in _one_error_line(capsys, "convert")


def test_convert_unwritable_directory(tmp_path, capsys, monkeypatch):
    # as root every directory is writable, so ask os.access the way an ordinary user would
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != tmp_path)
    assert main(["convert", NOT_A_MODEL, str(tmp_path / "out.safetensors"), "-q"]) == 2
    assert "permission denied" in _one_error_line(capsys, "convert")


@pytest.mark.parametrize("exc, message", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"),
     "/data/x: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/y"), "/data/y: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "/data: Is a directory"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (ValueError("does not fit:\n  first: 1\n  second: 2"), "does not fit: first: 1; second: 2"),
    (ValueError("line one\nline two"), "line one; line two"),
    (ImportError("HFTokenizer needs the Hugging Face `tokenizers` package"), "tokenizers"),
])
def test_anticipated_errors_are_one_line(exc, message, monkeypatch, capsys):
    def run(args):
        raise exc
    monkeypatch.setattr(info_command, "run", run)
    assert main(["info", NOT_A_MODEL]) == 2
    assert message in _one_error_line(capsys, "info")


def test_unexpected_error_keeps_its_traceback(monkeypatch):
    def run(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(info_command, "run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", NOT_A_MODEL])


# ---- train: the config is checked before data is opened or a model is built ----------------
@pytest.fixture(autouse=True)
def no_trainer(monkeypatch):
    """Fail (rather than train) if a bad config ever got as far as building the trainer."""
    import rwkv_jax.train.trainer

    class NoTrainer:
        def __init__(self, cfg):
            raise AssertionError("the config was accepted and the trainer built")

    monkeypatch.setattr(rwkv_jax.train.trainer, "Trainer", NoTrainer)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("hello world\n" * 50)
    return p


TRAIN_BAD = [
    ("model.n_layer=100000", "GiB with gradients and optimizer state"),
    ("model.n_embd=65536", "more than this machine's"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("data.ctx_len=0", "data.ctx_len: must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("checkpoint.every=0", "checkpoint.every: must be >= 1, got 0"),
    ("checkpoint.keep=0", "checkpoint.keep: must be >= 1, got 0"),
    ("train.eval_batches=0", "train.eval_batches: must be >= 1 when train.eval_every > 0"),
    ("train.max_steps=-1", "train.max_steps: must be >= 0, got -1"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps: must be >= 0, got -5"),
    ("optimizer.lr=0", "optimizer.lr: must be a finite number > 0, got 0.0"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number > 0, got nan"),
    ("optimizer.lr=.inf", "optimizer.lr: must be a finite number > 0, got inf"),
    ("optimizer.lr_final=-1e-4", "optimizer.lr_final: must be a finite number >= 0"),
    ("optimizer.beta1=1", "optimizer.beta1: must be in [0, 1), got 1.0"),
    ("optimizer.beta2=-0.1", "optimizer.beta2: must be in [0, 1), got -0.1"),
    ("optimizer.eps=0", "optimizer.eps: must be a finite number > 0, got 0.0"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip: must be a finite number >= 0"),
    ("data.val_fraction=0", "data.val_fraction: must be in (0, 1), got 0.0"),
    ("data.val_fraction=1", "data.val_fraction: must be in (0, 1), got 1.0"),
    ("data.tokenizer=klingon", "data.tokenizer: unknown tokenizer 'klingon'"),
    ("data.tokenizer=missing.json", "data.tokenizer: tokenizer file not found: missing.json"),
    ("model.wkv_impl=associative model.version=7",
     "has no 'associative' form; valid: auto, scan, chunked, pallas"),
    ("model.wkv_impl=chunked model.version=4", "has no 'chunked' form"),
    ("model.wkv_impl=associative model.version=7", "has no 'associative' form"),
    ("mesh.data=0", "mesh.data: must be -1 (the remaining devices) or >= 1, got 0"),
    ("mesh.fsdp=0", "mesh.fsdp: must be -1 (the remaining devices) or >= 1, got 0"),
    ("mesh.data=4096", "4096 devices, but only"),
]


@pytest.mark.parametrize("overrides, message", TRAIN_BAD)
def test_train_bad_value_names_the_key(overrides, message, text_file, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "tokens"
    argv = ["train", f"out_dir={out}", f"data.path={text_file}", f"data.cache_dir={cache}",
            *overrides.split()]
    assert main(argv) == 2
    err = _one_error_line(capsys, "train")
    assert message in err
    assert overrides.split("=")[0] in err  # names the key
    assert not out.exists() and not cache.exists()  # nothing written, the data never opened


def test_eval_batches_zero_allowed_when_eval_is_off(text_file):
    from rwkv_jax.train.config import load_config
    cfg = load_config(None, [f"data.path={text_file}", "train.eval_every=0",
                             "train.eval_batches=0", "train.max_steps=0"])
    assert cfg.train.eval_batches == 0 and cfg.train.max_steps == 0


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "data.path: {p} does not exist"),
    (lambda d: d, "data.path: {p} is a directory"),
    (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "data.path: {p} is not a regular file"),
])
def test_train_bad_data_path(make, message, tmp_path, capsys):
    p = make(tmp_path)
    assert main(["train", f"out_dir={tmp_path / 'run'}", f"data.path={p}"]) == 2
    assert message.format(p=p) in _one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_prepared_prefix_is_a_valid_data_path(tmp_path):
    from rwkv_jax.train.config import load_config
    (tmp_path / "tok.bin").write_bytes(b"")
    (tmp_path / "tok.json").write_text("{}")
    assert load_config(None, [f"data.path={tmp_path / 'tok'}"]).data.path == str(tmp_path / "tok")


def test_train_out_dir_is_a_file(text_file, tmp_path, capsys):
    assert main(["train", f"out_dir={text_file}", f"data.path={text_file}"]) == 2
    assert f"out_dir: {text_file} exists and is not a directory" in \
        _one_error_line(capsys, "train")
    assert main(["train", f"out_dir={text_file}/run", f"data.path={text_file}"]) == 2
    assert f"{text_file} is not a directory" in _one_error_line(capsys, "train")


@pytest.mark.parametrize("content, message", [
    (None, "is a directory"),
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    (b"train:\n  max_steps: 1\n  batch_size: 2\n  max_steps: 3\n",
     "duplicate key train.max_steps (lines 2 and 4)"),
    (b"train: {}\ntrain: {}\n", "duplicate key train (lines 1 and 2)"),
    (b"- a\n- b\n", "the top level must be a mapping"),
    (b"train:\n  max_steps: [1\n", "not valid YAML"),
])
def test_train_bad_config_file(content, message, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["train", "--config", str(path), f"out_dir={tmp_path / 'run'}"]) == 2
    assert message in _one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_duplicate_key_in_an_override(capsys, tmp_path):
    assert main(["train", f"out_dir={tmp_path / 'run'}", "train={max_steps: 1, max_steps: 2}"]) \
        == 2
    assert "override train: duplicate key max_steps" in _one_error_line(capsys, "train")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    from rwkv_jax.train.config import load_config
    path = tmp_path / "cfg.yaml"
    text = "train:\n  <<: {max_steps: 7, batch_size: 2}\n  max_steps: 9\n"
    path.write_text(text)
    cfg = load_config(path)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 2)
