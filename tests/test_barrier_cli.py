"""`lmctk barrier`: table, curve, verdict, JSON and PNG outputs, pairwise matrix, refusals (exit 2)."""

from __future__ import annotations

import json

import pytest

from lmctk.cli import main
from lmctk.train import TrainConfig, fit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("barrier_runs")
    for seed in (0, 1, 2):
        config = TrainConfig(task="digits", model="mlp", model_options={"widths": [32]}, seed=seed, steps=60,
                             batch_size=32, optimizer="sgd", lr=0.05, eval_every=1000, checkpoints=[30])
        fit(config, root / f"seed{seed}")
    return root


def test_barrier_prints_table_curve_barriers_and_verdict(runs, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "plots"
    code = main(["barrier", str(runs / "seed0"), str(runs / "seed1"), "--align", "weight", "--points", "5",
                 "--threshold", "10", "--json", str(out_json), "--plot", str(out_png)])
    out = capsys.readouterr().out
    assert code == 0
    assert "aligned loss" in out and "loss along α" in out and "B_lin" in out
    assert "linearly connected: aligned mean-endpoint loss barrier" in out and "<= 10" in out
    data = json.loads(out_json.read_text())
    assert data["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(data["barriers"]["loss"]) == {"mean_endpoint", "linear"}
    assert data["aligned"]["barriers"]["error"]["linear"] is not None
    assert data["verdict"]["pairs"][0]["connected"] is True
    assert (out_png / "barrier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_barrier_refuses_existing_outputs_without_overwrite(runs, tmp_path, capsys):
    existing = tmp_path / "b.json"
    existing.write_text("{}")
    args = ["barrier", str(runs / "seed0"), str(runs / "seed1"), "--points", "3", "--json", str(existing)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "{}"
    assert main([*args, "--overwrite", "--threshold", "10"]) == 0
    assert json.loads(existing.read_text())["aligned"] is None


def test_barrier_says_not_connected_above_the_threshold_and_exits_3(runs, capsys):
    assert main(["barrier", str(runs / "seed0"), str(runs / "seed1"), "--points", "3", "--threshold", "-1"]) == 3
    assert "not linearly connected: raw mean-endpoint loss barrier" in capsys.readouterr().out


def test_barrier_of_three_models_prints_a_pairwise_matrix(runs, tmp_path, capsys):
    out_json = tmp_path / "m.json"
    ckpt = next((runs / "seed2" / "checkpoints").iterdir())  # a checkpoint dir inside a run works too
    code = main(["barrier", str(runs / "seed0"), str(runs / "seed1"), str(ckpt), "--points", "3",
                 "--task", "digits", "--threshold", "10", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0 and "raw loss barrier (mean-endpoint)" in out
    data = json.loads(out_json.read_text())
    matrix = data["matrices"]["raw"]["loss"]["mean_endpoint"]
    assert len(matrix) == 3 and matrix[0][1] == matrix[1][0] and matrix[2][2] == 0.0
    assert len(data["pairs"]) == 3 and len(data["verdict"]["pairs"]) == 3


@pytest.mark.parametrize("args,needle", [
    (["--renorm", "bn_reset"], "no BatchNorm"),
    (["--align", "perm"], "align"),
    (["--points", "1"], "at least 2"),
    (["--definition", "max"], "--definition"),
    (["--task-opt", "bogus=1"], "bogus"),  # options apply to the run's own task too
])
def test_barrier_bad_options_exit_2_with_one_line(runs, capsys, args, needle):
    assert main(["barrier", str(runs / "seed0"), str(runs / "seed1"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_barrier_needs_two_models(runs, capsys):
    assert main(["barrier", str(runs / "seed0")]) == 2
    assert "at least two" in capsys.readouterr().err
