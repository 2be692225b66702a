"""The console command: help, version, info, clean errors."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest


from rwkv_jax.cli import main


SUBCOMMANDS = ("train", "generate", "eval", "convert", "prepare", "info")


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out.split("COMMAND", 1)[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listing, name


@pytest.mark.parametrize("module", ["rwkv_jax", "rwkv_jax.cli"])
def test_python_dash_m_runs_subcommands(module):
    for name in SUBCOMMANDS:
        proc = subprocess.run([sys.executable, "-m", module, name, "--help"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: rwkv-jax {name}")


def test_info_on_fixture(fixtures_dir, capsys):
    assert main(["info", str(fixtures_dir / "rwkv7-tiny-834k.pth")]) == 0
    out = capsys.readouterr().out
    assert "version        7" in out and "n_layer        12" in out


def test_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not an RWKV checkpoint" in err and "Traceback" not in err


# ---- start-up: no JAX until a command runs -------------------------------------------------
def test_help_and_argument_errors_do_not_import_jax():
    code = """
import contextlib, io, sys
import rwkv_jax, rwkv_jax.cli
from rwkv_jax.cli import main
assert rwkv_jax.__version__
runs = [[], ["--help"], ["--version"], ["bogus"], ["eval", "--batch-size", "0"],
        ["generate", "--model", "/nonexistent", "--prompt", "a"]]
runs += [[name, "--help"] for name in %r]
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    assert code == (0 if argv[-1:] in ([], ["--help"], ["--version"]) else 2), (argv, code)
heavy = sorted(m for m in ("jax", "jaxlib", "flax", "optax", "orbax") if m in sys.modules)
print("heavy:", heavy)
""" % (SUBCOMMANDS,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "heavy: []"


def test_package_names_are_lazy_but_complete():
    import importlib

    import rwkv_jax
    for name in rwkv_jax.__all__:
        assert getattr(rwkv_jax, name) is not None, name
    importlib.import_module("rwkv_jax.generate")  # importing the submodule...
    assert callable(rwkv_jax.generate) and rwkv_jax.generate.__name__ == "generate"  # ...keeps it
    from rwkv_jax import Sampling, generate
    assert generate is rwkv_jax.generate and Sampling.__name__ == "Sampling"
    assert rwkv_jax.data.__name__ == "rwkv_jax.data"  # submodules load on attribute access
    with pytest.raises(AttributeError):
        rwkv_jax.no_such_name
    with pytest.raises(ImportError):
        from rwkv_jax import no_such_name  # noqa: F401


# ---- the persistent compilation cache (CLI only) -------------------------------------------
_COUNT_CACHE = """
import sys
from jax import monitoring
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
from rwkv_jax.cli import main
code = main(sys.argv[1:])
print(f"hits {events.count('/jax/compilation_cache/cache_hits')} "
      f"misses {events.count('/jax/compilation_cache/cache_misses')}", file=sys.stderr)
sys.exit(code)
"""


def _env(tmp_path, **extra) -> dict:
    """The environment of a user with no JAX or rwkv-jax cache settings, HOME in tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "RWKV_JAX_CACHE", "RWKV_JAX_COMPILATION", "XDG_"))}
    return {**env, "HOME": str(tmp_path / "home"), **extra}


def _files(d: pathlib.Path) -> dict[str, float]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def _generate(fixtures_dir, *extra) -> list[str]:
    return ["generate", "--model", str(fixtures_dir / "rwkv4-tiny-660k.pth"), "--prompt", "Hi",
            "--temperature", "0", "--max-tokens", "4", "-q", *extra]


@pytest.fixture(scope="module")
def warm_cache(fixtures_dir, tmp_path_factory):
    """A first ``rwkv-jax generate`` with the default cache place ($XDG_CACHE_HOME/rwkv-jax/xla)
    of a user with no settings: (environment, cache dir, that run)."""
    root = tmp_path_factory.mktemp("cli-cache")
    env = _env(root, XDG_CACHE_HOME=str(root / "xdg"))
    first = subprocess.run([sys.executable, "-c", _COUNT_CACHE, *_generate(fixtures_dir)],
                           capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert not (root / "home").exists()  # ~/.cache is only the last resort
    return env, root / "xdg" / "rwkv-jax" / "xla", first


def _cache_counts(run) -> tuple[int, int]:
    words = run.stderr.split()
    assert words[-4] == "hits" and words[-2] == "misses", run.stderr
    return int(words[-3]), int(words[-1])


def test_compile_cache_second_run_loads_every_program(warm_cache, fixtures_dir):
    env, cache, first = warm_cache
    hits, misses = _cache_counts(first)
    assert misses > 0 and hits == 0, first.stderr  # a cold cache: everything compiled ...
    entries = _files(cache)
    assert len(entries) >= misses  # ... and written
    second = subprocess.run([sys.executable, "-c", _COUNT_CACHE, *_generate(fixtures_dir)],
                            capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout and len(second.stdout) > 0
    hits, misses = _cache_counts(second)
    assert misses == 0 and hits > 0, second.stderr  # every program loaded from the cache
    assert _files(cache) == entries  # nothing recompiled, nothing rewritten


def test_compile_cache_opt_out_writes_nothing(fixtures_dir, tmp_path):
    off = tmp_path / "xla"
    proc = subprocess.run([sys.executable, "-m", "rwkv_jax", "--no-compile-cache",
                           *_generate(fixtures_dir)], capture_output=True, text=True,
                          env=_env(tmp_path, RWKV_JAX_CACHE_DIR=str(off)))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) > 0
    assert not off.exists() and not (tmp_path / "home").exists()


def test_compile_cache_settings():
    from rwkv_jax.cli import build_parser, compile_cache
    p, m = build_parser(), __file__
    for argv in (["--no-compile-cache", "info", m], ["info", m, "--no-compile-cache"]):
        assert p.parse_args(argv).no_compile_cache is True
    assert p.parse_args(["info", m]).no_compile_cache is False
    assert "RWKV_JAX_COMPILATION_CACHE=0" in p.format_help()
    home = pathlib.Path.home()
    assert compile_cache.cache_dir({}) == home / ".cache" / "rwkv-jax" / "xla"
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/x"}) == pathlib.Path("/x/rwkv-jax/xla")
    assert compile_cache.cache_dir({"RWKV_JAX_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == \
        pathlib.Path("/c/xla")
    assert compile_cache.cache_dir({"RWKV_JAX_CACHE_DIR": "/d", "RWKV_JAX_CACHE": "/c"}) == \
        pathlib.Path("/d")
    for value, on in (("0", False), ("off", False), ("False", False), ("1", True), ("", True)):
        assert compile_cache.wanted(False, {"RWKV_JAX_COMPILATION_CACHE": value}) is on
    assert compile_cache.wanted(True, {}) is False


def test_library_leaves_jax_config_alone(fixtures_dir, tmp_path):
    """Importing every public name, loading and generating change none of JAX's cache
    settings and not XLA_FLAGS (only the CLI sets those)."""
    code = f"""
import os
import jax, numpy as np
names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
         "jax_persistent_cache_min_compile_time_secs")
before = [getattr(jax.config, n) for n in names] + [os.environ.get("XLA_FLAGS")]
import rwkv_jax, rwkv_jax.cli, rwkv_jax.evaluate, rwkv_jax.data
for name in rwkv_jax.__all__:
    getattr(rwkv_jax, name)
model = rwkv_jax.load({str(fixtures_dir / 'rwkv4-tiny-660k.pth')!r})
rwkv_jax.generate(model, rwkv_jax.tokenizers.ByteTokenizer(), "Hi", max_tokens=2)
after = [getattr(jax.config, n) for n in names] + [os.environ.get("XLA_FLAGS")]
assert before == after, (before, after)
print(after[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


# ---- pipes and Ctrl-C ----------------------------------------------------------------------
# A suite started as a background job (``pytest &`` from a script) runs with SIGINT ignored,
# and a child inherits that, as a background job should; the tests want a terminal's Ctrl-C,
# so the child puts Python's own handler back before running the command (no preexec_fn:
# forking a multithreaded JAX process to run Python before exec can deadlock).
_WITH_CTRL_C = ("import runpy, signal, sys; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'rwkv-jax'; runpy.run_module('rwkv_jax', run_name='__main__')")


def _streaming_generate(fixtures_dir, warm_cache) -> subprocess.Popen:
    """``rwkv-jax generate`` that would run for a long time; returns once it has written."""
    proc = subprocess.Popen([sys.executable, "-c", _WITH_CTRL_C,
                             *_generate(fixtures_dir)[:-3], "--max-tokens", "1000000", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=warm_cache[0])
    assert len(proc.stdout.read(4)) == 4  # it is streaming now
    return proc


def test_closed_stdout_pipe_exits_quietly(fixtures_dir, warm_cache):
    """``rwkv-jax generate ... | head -c 4``: no message, no traceback, status 128 + SIGPIPE."""
    proc = _streaming_generate(fixtures_dir, warm_cache)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == 128 + signal.SIGPIPE


def test_ctrl_c_is_one_line_and_130(fixtures_dir, warm_cache):
    proc = _streaming_generate(fixtures_dir, warm_cache)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.decode() == "rwkv-jax generate: interrupted\n"


def test_ctrl_c_swallowed_by_a_library_callback_still_stops_generate(monkeypatch, fixtures_dir,
                                                                   capsys, request):
    """jax-ml/jax#18246: a KeyboardInterrupt raised inside a callback JAX runs for Python (its
    gc hook) can be swallowed there; the remembered Ctrl-C still ends the loop, in one line."""
    import importlib

    generation = importlib.import_module("rwkv_jax.generate")  # the module, not the function

    def endless(*args, **kwargs):
        for i in range(10_000):
            if i == 3:
                try:  # what the swallowing callback does with the signal handler's exception
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass
            yield ["x"], None
        raise AssertionError("the interrupt was lost")

    monkeypatch.setattr(generation, "stream_with_state", endless)
    # Python's own handler, as in a terminal (a background-job suite inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    argv = ["generate", "--model", str(fixtures_dir / "rwkv4-tiny-660k.pth"), "--prompt", "Hi"]
    assert main(argv) == 130
    out, err = capsys.readouterr()
    assert out == "xxx" and err.endswith("rwkv-jax generate: interrupted\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_in_train_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import rwkv_jax.train.trainer

    class Interrupted:
        def __init__(self, cfg):
            raise KeyboardInterrupt

    monkeypatch.setattr(rwkv_jax.train.trainer, "Trainer", Interrupted)
    assert main(["train", f"out_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == ("rwkv-jax train: interrupted; rerun the same command "
                                       "to resume from the last checkpoint\n")


# ---- eval progress -------------------------------------------------------------------------
def test_eval_progress_on_stderr_and_quiet(fixtures_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Speak, speak. " * 20)  # 280 bytes: 279 scored tokens, 18 windows of 16
    argv = ["eval", "--model", str(fixtures_dir / "rwkv4-tiny-660k.pth"), "--data", str(text),
            "--ctx-len", "16"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("loss ") and "(279 tokens, 279 bytes;" in out
    assert re.search(r"eval: .*\d+/\d+", err), err  # the tqdm bar, on stderr only
    assert main(argv + ["-q"]) == 0
    out_q, err_q = capsys.readouterr()
    assert out_q == out and err_q == ""
