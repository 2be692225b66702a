"""The console command: help, version, info, clean errors."""

from __future__ import annotations

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
