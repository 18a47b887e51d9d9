"""Every bad input exits 2 with one line and no traceback, writes nothing and leaves outputs untouched."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmctk.cli import main
from tests.test_io import small_state, write_raw_safetensors, write_sharded_bin

RECIPE = Path(__file__).parent.parent / "recipes" / "butterfly-digits-mlp.toml"


def _st(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors or {"w": torch.ones(2)}, str(path))
    return path


def _hf(path: Path, config: object) -> Path:
    path.mkdir()
    _st(path / "model.safetensors", w=torch.ones(4, 4))
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _make(tmp: Path) -> None:
    """The inputs every case may name; cheap enough to build per case."""
    _st(tmp / "a.safetensors", w=torch.ones(2))
    _st(tmp / "b.safetensors", w=torch.zeros(2))
    _st(tmp / "other_keys.safetensors", v=torch.ones(2))
    _st(tmp / "other_shape.safetensors", w=torch.ones(3))
    _st(tmp / "nan.safetensors", w=torch.tensor([1.0, float("nan")]))
    full = (tmp / "a.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(full[:-4])
    (tmp / "huge_header.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (tmp / "not_json.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    (tmp / "list_header.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    deep = b"[" * 200_000 + b"]" * 200_000
    (tmp / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    write_raw_safetensors(tmp / "offsets.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    write_raw_safetensors(tmp / "entry.safetensors", {"w": {"dtype": "F32", "shape": [2]}})
    write_raw_safetensors(tmp / "dtype.safetensors", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                          bytes(16))
    write_raw_safetensors(tmp / "span.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                          bytes(4))
    (tmp / "notes.txt").write_text("hi")
    (tmp / "empty").mkdir()
    os.mkfifo(tmp / "fifo.safetensors")
    os.symlink("/dev/zero", tmp / "zero.safetensors")
    os.symlink(tmp / "loop.safetensors", tmp / "loop.safetensors")
    os.symlink(tmp / "gone.safetensors", tmp / "dangling.safetensors")
    torch.save({"w": torch.zeros(2), "obj": ValueError("pickled")}, tmp / "object.pt")
    (tmp / "code.pt").write_bytes(pickle.dumps(os.getcwd, protocol=4))
    (tmp / "garbage.pt").write_bytes(b"garbage bytes")
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp / "mixed.pt")
    sharded = write_sharded_bin(tmp / "sharded", small_state())
    index = sharded / "pytorch_model.bin.index.json"
    for name, text in (("escape", None), ("missing", None), ("index_json", "[1, 2"), ("index_deep", "[" * 100_000)):
        d = tmp / name
        shutil.copytree(sharded, d)
        if text is not None:
            (d / index.name).write_text(text)
    data = json.loads(index.read_text())
    (tmp / "escape" / index.name).write_text(json.dumps(data | {"weight_map": {"w": "../a.safetensors"}}))
    (tmp / "missing" / "pytorch_model-00002-of-00002.bin").unlink()
    (tmp / "run").mkdir()
    (tmp / "run" / "manifest.json").write_text("{}")
    (tmp / "run" / "checkpoints").mkdir()
    (tmp / "recipe_latin1.toml").write_bytes(b"[soup]\nout = 'caf\xe9'\n")
    (tmp / "recipe_bad.toml").write_text("[soup\n")
    (tmp / "recipe_key.toml").write_text("[soup]\nmethd = 'uniform'\ningredients = []\n")
    (tmp / "recipe_nan.toml").write_text(
        f"[soup]\nmethod = 'weighted'\nout = '{tmp}/out'\n"
        f"[[soup.ingredients]]\npath = '{tmp}/a.safetensors'\nweight = nan\n"
        f"[[soup.ingredients]]\npath = '{tmp}/b.safetensors'\n")
    os.mkfifo(tmp / "recipe_fifo.toml")
    shutil.copy(RECIPE, tmp / "butterfly.toml")
    (tmp / "file").write_text("a regular file")
    (tmp / "existing").mkdir()
    (tmp / "existing" / "keep.txt").write_text("keep")
    gpt2 = {"model_type": "gpt2", "vocab_size": 4, "n_embd": 4, "n_layer": 1, "n_head": 1, "n_positions": 4}
    _hf(tmp / "hf_garbage", "{not json")
    _hf(tmp / "hf_type", gpt2 | {"model_type": "transformer9000"})
    _hf(tmp / "hf_absurd", gpt2 | {"vocab_size": 10**9, "n_embd": 10**6})
    _hf(tmp / "hf_negative", gpt2 | {"n_layer": -3})


SOUP = ["soup", "{t}/a.safetensors", "{t}/b.safetensors"]
TRAIN = ["train", "--out", "{t}/out", "--steps", "1"]
RUN = ["run", "{t}/butterfly.toml", "--out", "{t}/out"]

CASES = {
    # input files (inspect reads headers only)
    "missing file": (["inspect", "{t}/nope.safetensors"], "does not exist"),
    "truncated safetensors": (["inspect", "{t}/truncated.safetensors"], "truncated"),
    "header larger than file": (["inspect", "{t}/huge_header.safetensors"], "exceeds the file size"),
    "header not JSON": (["inspect", "{t}/not_json.safetensors"], "not valid JSON"),
    "header not an object": (["inspect", "{t}/list_header.safetensors"], "not a JSON object"),
    "header nested 200k deep": (["inspect", "{t}/deep.safetensors"], "nested too deeply"),
    "offsets out of range": (["inspect", "{t}/offsets.safetensors"], "ends at data byte 8"),
    "malformed header entry": (["inspect", "{t}/entry.safetensors"], "malformed header entry"),
    "unknown dtype": (["inspect", "{t}/dtype.safetensors"], "dtype 'F128'"),
    "span does not match shape": (["inspect", "{t}/span.safetensors"], "spans 4 bytes"),
    "unknown extension": (["inspect", "{t}/notes.txt"], "unknown checkpoint extension"),
    "empty dir": (["inspect", "{t}/empty"], "no checkpoint in this dir"),
    "FIFO": (["inspect", "{t}/fifo.safetensors"], "is a FIFO, not a regular file or dir"),
    "symlink to /dev/zero": (["inspect", "{t}/zero.safetensors"], "character device"),
    "symlink loop": (["inspect", "{t}/loop.safetensors"], "symlink loop"),
    "dangling symlink": (["inspect", "{t}/dangling.safetensors"], "symlink whose target does not exist"),
    "pickled object": (["inspect", "{t}/object.pt"], "weights-only loading refuses (a pickled exceptions.ValueError)"),
    "pickled code": (["inspect", "{t}/code.pt"], "contains code or objects that weights-only loading refuses"),
    "garbage .pt": (["inspect", "{t}/garbage.pt"], "torch.load cannot read it"),
    "non-tensor entries": (["inspect", "{t}/mixed.pt"], "'epoch' (int)"),
    "index naming ../ files": (["inspect", "{t}/escape"], "not a valid shard index"),
    "index naming a missing shard": (["inspect", "{t}/missing"], "shard named by pytorch_model.bin.index.json does not"),
    "index not JSON": (["inspect", "{t}/index_json"], "not a valid shard index"),
    "index nested deep": (["inspect", "{t}/index_deep"], "not a valid shard index"),
    "run dir without checkpoints": (["inspect", "{t}/run"], "no checkpoints/stepNNNNNNNN"),
    # soups
    "key mismatch": (["soup", "{t}/a.safetensors", "{t}/other_keys.safetensors", "--out", "{t}/out"], "different keys"),
    "shape mismatch": (["soup", "{t}/a.safetensors", "{t}/other_shape.safetensors", "--out", "{t}/out"], "shape (2,) vs (3,)"),
    "NaN in a checkpoint": (["soup", "{t}/a.safetensors", "{t}/nan.safetensors", "--out", "{t}/out"], "1 NaN/Inf"),
    "weights nan": ([*SOUP, "--weights", "nan,1", "--out", "{t}/out"], "must be finite and non-negative"),
    "weights inf": ([*SOUP, "--weights", "inf,1", "--out", "{t}/out"], "must be finite and non-negative"),
    "weights negative": ([*SOUP, "--weights", "-1,1", "--out", "{t}/out"], "must be finite and non-negative"),
    "weights not numbers": ([*SOUP, "--weights", "a,b", "--out", "{t}/out"], "comma-separated list of numbers"),
    "recipe not UTF-8": (["soup", "--recipe", "{t}/recipe_latin1.toml"], "not UTF-8 text"),
    "recipe not TOML": (["soup", "--recipe", "{t}/recipe_bad.toml"], "not valid TOML"),
    "recipe unknown key": (["soup", "--recipe", "{t}/recipe_key.toml"], "soup.methd: unknown key"),
    "recipe NaN weight": (["soup", "--recipe", "{t}/recipe_nan.toml"], "must be finite and non-negative"),
    "recipe is a FIFO": (["soup", "--recipe", "{t}/recipe_fifo.toml"], "is a FIFO"),
    "output under a regular file": ([*SOUP, "--out", "{t}/file/soup"], "cannot write the output"),
    "existing output": ([*SOUP, "--out", "{t}/existing"], "output already exists"),
    "config.json garbage": ([*SOUP, "--align-to", "{t}/hf_garbage", "--dry-run"], "not valid UTF-8 JSON"),
    "config.json unknown model_type": ([*SOUP, "--align-to", "{t}/hf_type", "--dry-run"], "'transformer9000' is not"),
    "config.json absurd sizes": ([*SOUP, "--align-to", "{t}/hf_absurd", "--dry-run"], "the checkpoint holds 16"),
    "config.json negative size": ([*SOUP, "--align-to", "{t}/hf_negative", "--dry-run"], "n_layer=-3 must be a positive"),
    # training
    "lr nan": ([*TRAIN, "--lr", "nan"], "lr: must be a finite number > 0, got nan"),
    "lr negative": ([*TRAIN, "--lr", "-1"], "lr: must be a finite number > 0"),
    "momentum inf": ([*TRAIN, "--momentum", "inf"], "momentum: must be a finite number >= 0"),
    "grad clip zero": ([*TRAIN, "--grad-clip", "0"], "grad_clip: must be a finite number > 0"),
    "model option not a number": ([*TRAIN, "--model-opt", "widths=abc"], "widths='abc' must be positive integers"),
    "model option zero width": ([*TRAIN, "--model-opt", "widths=[0]"], "widths=[0] must be positive integers"),
    "model option not key=value": ([*TRAIN, "--model-opt", "widths"], "key=value"),
    "unknown task": ([*TRAIN, "--task", "digts"], "digts"),
    "unknown optimizer": ([*TRAIN, "--optimizer", "adam"], "optimizer"),
    "train output under a file": (["train", "--out", "{t}/file/run", "--steps", "1"], "file/run"),
    # recipes of `lmctk run`: every value checked before training
    "set widths [0]": ([*RUN, "--set", "train.model_options.widths=[0]"], "widths=[0] must be positive integers"),
    "set measure.points 1": ([*RUN, "--set", "measure.points=1"], "measure: points: must be at least 2"),
    "set measure.points nan": ([*RUN, "--set", "measure.points=nan"], "measure.points: expected an integer"),
    "set train.lr nan": ([*RUN, "--set", "train.lr=nan"], "lr: must be a finite number > 0"),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _one_line(capsys, code: int, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in " ".join(err.split()), err
    return lines[0]


def _param(case: str, value):
    if hasattr(value, "marks"):  # already a pytest.param
        return pytest.param(*value.values, marks=value.marks, id=case)
    return pytest.param(*value, id=case)


@pytest.mark.parametrize(("args", "needle"), [_param(c, v) for c, v in CASES.items()])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, needle, tmp_path, capsys):
    _make(tmp_path)
    before = _snapshot(tmp_path)
    code = main([a.replace("{t}", str(tmp_path)) for a in args])
    _one_line(capsys, code, needle)
    after = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(".out.partial")}
    assert after == before  # nothing visible half-written (a hidden .partial stays for --resume), outputs untouched


def test_full_disk_leaves_the_old_output(tmp_path, capsys, monkeypatch):
    _make(tmp_path)
    (tmp_path / "i.json").write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lmctk.io.atomic._commit", full)
    code = main(["inspect", str(tmp_path / "a.safetensors"), "--json", str(tmp_path / "i.json"), "--overwrite"])
    _one_line(capsys, code, "i.json: cannot write the output (No space left on device)")
    assert (tmp_path / "i.json").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".i.json")]


def test_read_only_mount_during_a_soup_leaves_no_output(tmp_path, capsys, monkeypatch):
    """Root ignores directory permissions, so the read-only mount is simulated at the write itself."""
    _make(tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("lmctk.io.stream._write_tensor", read_only)
    code = main([a.replace("{t}", str(tmp_path)) for a in [*SOUP, "--out", "{t}/out"]])
    _one_line(capsys, code, "out: cannot write the output (Read-only file system)")
    assert not (tmp_path / "out").exists()


def test_resume_over_a_changed_ingredient_is_refused(tmp_path, capsys, monkeypatch):
    _make(tmp_path)
    args = [a.replace("{t}", str(tmp_path)) for a in [*SOUP, "--out", "{t}/out"]]
    with monkeypatch.context() as m:  # killed after the plan is journalled, before any shard is done
        m.setattr("lmctk.io.stream._write_tensor", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(args) == 130
    assert "interrupted; resume with: lmctk soup" in capsys.readouterr().err
    _st(tmp_path / "b.safetensors", w=torch.full((2,), 5.0))  # same size and header: only mtime and bytes differ
    code = main([*args, "--resume"])
    _one_line(capsys, code, "b.safetensors: input changed since the interrupted write")
    assert not (tmp_path / "out").exists()
    assert main([*args[:-2], "--out", str(tmp_path / "out"), "--overwrite"]) == 0  # starting over works
