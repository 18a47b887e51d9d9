"""The command line: train/inspect work end to end; bad input is one red line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lmctk import __version__
from lmctk.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmctk", *args], capture_output=True, text=True, timeout=300)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.slow
def test_train_then_inspect_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--task", "digits", "--model", "mlp", "--seed", "0", "--steps", "60",
                   "--out", str(out), "--checkpoints", "0,30", "--quiet", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert "trained 60 steps" in proc.stdout and "step 30/60" not in proc.stdout  # --quiet: no progress
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == 60 and result["final"]["test"]["accuracy"] > 0.5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step00000000", "step00000030", "step00000060"]

    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "hidden.0" in proc.stdout and "total" in proc.stdout

    again = run_cli("train", "--steps", "5", "--out", str(out))
    assert again.returncode == 2
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_inspect_counts_parameters(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_file({"layer.0.weight": torch.zeros(4, 3), "layer.0.bias": torch.zeros(4), "head.weight": torch.zeros(2, 4)}, str(path))
    assert main(["inspect", str(path), "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "layer.0" in out and "head" in out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["num_params"] == 4 * 3 + 4 + 2 * 4


@pytest.mark.parametrize(
    "args,needle",
    [
        (["inspect", "{tmp}/nope.safetensors"], "does not exist"),
        (["inspect", "{tmp}/bad.safetensors"], "bad.safetensors"),
        (["train", "--task", "digts", "--out", "{tmp}/r"], "digts"),
        (["train", "--model", "transformer9000", "--out", "{tmp}/r"], "transformer9000"),
        (["train", "--optimizer", "adam", "--out", "{tmp}/r"], "optimizer"),
        (["train", "--model-opt", "widths", "--out", "{tmp}/r"], "key=value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    proc = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "inspect", str(tmp_path / "nope"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["trian"], "No such command 'trian'"),
        (["run", "R.toml", "--bogus"], "No such option: --bogus"),
        (["barrier", "a", "b", "--points", "abc"], "Invalid value for '--points'"),
        (["align", "runs/a"], "Missing argument 'B'"),
    ],
)
def test_usage_errors_exit_2_with_message_and_usage_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"Error: {message}" in err
    assert err.lstrip().startswith("Usage: lmctk")


def test_debug_is_accepted_after_the_command(tmp_path):
    proc = run_cli("inspect", str(tmp_path / "nope"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "No such option" not in proc.stderr


def test_flags_show_no_bool_metavar_in_help(capsys):
    assert main(["barrier", "--help"]) == 0
    assert "<bool>" not in capsys.readouterr().out


def test_ctrl_c_names_the_resume_command(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lmctk.train.fit", interrupted)
    out = tmp_path / "r"
    assert main(["train", "--steps", "5", "--out", str(out), "--overwrite"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert f"interrupted; resume with: lmctk train --steps 5 --out {out} --resume" in err


def test_train_resume_with_nothing_to_resume_is_an_error(tmp_path, capsys):
    assert main(["train", "--steps", "5", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume at" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
