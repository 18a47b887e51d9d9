"""Tasks: built-in data, the data-order sampler, eval caching, user tasks, and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lmctk.errors import ConfigError, MissingPathError
from lmctk.seeding import derive_seed
from lmctk.tasks import TASKS, DataOrder, evaluate, get_task
from lmctk.tasks.base import IGNORE_INDEX
from lmctk.tasks.tokens import default_text


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


@pytest.fixture(scope="module")
def text():
    return get_task("text")


@pytest.fixture(scope="module")
def mlm():
    return get_task("text-mlm")


class Constant(nn.Module):
    """A model whose logits ignore the input: zeros of shape [*batch dims, n]."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x=None, input_ids=None, attention_mask=None):
        lead = (x if x is not None else input_ids).shape[: 1 if x is not None else 2]
        return torch.zeros(*lead, self.n) * self.scale


USER_MODULE = """
import torch
from lmctk.tasks import TensorClassification

def one_hot(n=30, classes=3):
    y = torch.arange(n) % classes
    x = torch.nn.functional.one_hot(y, classes).float()
    return TensorClassification("one-hot", {s: (x, y) for s in ("train", "val", "test")}, classes)

def not_a_task():
    return object()

def odd_kind():
    task = one_hot()
    task.kind = "regression"
    return task
"""


def test_derive_seed_is_stable_63_bit_and_distinct():
    assert derive_seed(0, "epoch", 0) == 1871625283114504911
    seeds = {derive_seed(s, name, e) for s in range(3) for name in ("epoch", "init") for e in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)


def test_digits_split_is_stratified_70_10_20(digits):
    sizes = {split: len(batch) for split, batch in digits.splits.items()}
    assert sizes == {"train": 1259, "val": 179, "test": 359} and digits.num_train == 1259
    assert digits.model_options() == {"in_shape": (1, 8, 8), "num_classes": 10}
    class_sizes = torch.cat([b.targets for b in digits.splits.values()]).bincount()
    for split, fraction in (("val", 0.1), ("test", 0.2)):
        counts = digits.splits[split].targets.bincount(minlength=10)
        assert torch.all((counts - fraction * class_sizes).abs() <= 0.5)


def test_digits_are_sklearns_images_standardised_by_training_stats(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    train = digits.splits["train"].inputs["x"]
    assert train.shape == (1259, 1, 8, 8)
    assert abs(train.mean().item()) < 1e-5 and train.std().item() == pytest.approx(1, abs=1e-5)
    # Undo the affine standardisation: every (image, label) pair is sklearn's, each exactly once.
    low, high = train.min(), train.max()
    ours = []
    for batch in digits.splits.values():
        pixels = (batch.inputs["x"].flatten(1) - low) / (high - low) * 16
        assert torch.allclose(pixels, pixels.round(), atol=1e-4)
        ours += [(*row, label) for row, label in zip(pixels.round().int().tolist(), batch.targets.tolist())]
    theirs = [
        (*row, label) for row, label in zip(reference.data.astype(int).tolist(), reference.target.tolist())
    ]
    assert sorted(ours) == sorted(theirs)


def test_digits_is_identical_across_get_task_calls(digits):
    again = get_task("digits")
    for split in ("train", "val", "test"):
        assert torch.equal(digits.splits[split].inputs["x"], again.splits[split].inputs["x"])
        assert torch.equal(digits.splits[split].targets, again.splits[split].targets)


def test_data_order_is_a_pure_function_of_seed_and_step():
    order = DataOrder(100, seed=7, batch_size=10)
    forward_pass = [order.indices(step) for step in range(25)]
    fresh = DataOrder(100, seed=7, batch_size=10)
    for step in reversed(range(25)):
        assert torch.equal(fresh.indices(step), forward_pass[step])
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(derive_seed(7, "epoch", 2)))
    assert torch.equal(torch.cat(forward_pass[20:25]), expected[:50])
    for epoch in range(2):
        seen = torch.cat(forward_pass[10 * epoch : 10 * epoch + 10])
        assert torch.equal(seen.sort().values, torch.arange(100))
    assert not torch.equal(torch.cat(forward_pass[:10]), torch.cat(forward_pass[10:20]))
    other = DataOrder(100, seed=8, batch_size=10)
    assert not torch.equal(torch.cat([other.indices(s) for s in range(10)]), torch.cat(forward_pass[:10]))


def test_data_order_drops_partial_batches_and_rejects_oversized_batches():
    order = DataOrder(10, seed=0, batch_size=3)
    assert order.steps_per_epoch == 3
    epoch = torch.cat([order.indices(s) for s in range(3)])
    assert len(epoch.unique()) == 9 and torch.equal(epoch, order.permutation(0)[:9])
    with pytest.raises(ConfigError, match="batch_size=11"):
        DataOrder(10, seed=0, batch_size=11)


def test_eval_batches_are_cached_and_chunked(digits):
    first = digits.eval_batches("test")
    assert digits.eval_batches("test") is first and len(first) == 1
    chunks = digits.eval_batches("test", batch_size=100)
    assert [len(b) for b in chunks] == [100, 100, 100, len(first[0]) - 300]
    assert digits.eval_batches("test", "cpu", 100) is chunks
    assert torch.equal(torch.cat([b.targets for b in chunks]), first[0].targets)
    assert len(digits.eval_batches("train")[0]) == digits.num_train
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        digits.eval_batches("dev")


def test_synthetic_shapes_determinism_and_options():
    task = get_task("synthetic", num_train=256, num_test=128)
    assert task.model_options() == {"in_shape": (32,), "num_classes": 10}
    assert task.num_train == 256 and len(task.eval_batches("test")[0]) == 128
    again = get_task("synthetic", num_train=256, num_test=128)
    assert torch.equal(task.splits["train"].inputs["x"], again.splits["train"].inputs["x"])
    other = get_task("synthetic", num_train=256, num_test=128, seed=1)
    assert not torch.equal(task.splits["train"].inputs["x"], other.splits["train"].inputs["x"])
    image = get_task("synthetic", image=True, num_classes=4)
    assert image.model_options() == {"in_shape": (1, 8, 8), "num_classes": 4}
    assert image.train_batch(torch.arange(5), torch.Generator()).inputs["x"].shape == (5, 1, 8, 8)
    with pytest.raises(ConfigError, match="dim and image"):
        get_task("synthetic", dim=16, image=True)


def test_text_windows_decode_to_pydoc_text_and_targets_are_next_bytes(text):
    source = default_text()
    assert text.decode(text.tokens.ids) == source
    assert text.model_options() == {"vocab_size": 256, "max_positions": 64}
    windows = text.windows["train"]
    n = len(source.encode())
    assert text.num_train == len(windows) == (n - 2 * (n // 20)) // 64
    assert torch.equal(windows.flatten(), text.tokens.ids[: windows.numel()])
    assert text.decode(windows[0]) == source.encode()[:64].decode()
    batch = text.train_batch(torch.tensor([3, 0]), torch.Generator())
    ids = batch.inputs["input_ids"]
    assert torch.equal(ids[1], windows[0]) and torch.equal(batch.targets, ids[:, 1:])
    assert torch.equal(batch.inputs["attention_mask"], torch.ones_like(ids))
    val = text.eval_batches("val")[0]
    assert len(val) == 64 and val.targets.shape == (64, 63)
    held_out = set(map(tuple, text.windows["val"].tolist()))
    assert all(tuple(row) in held_out for row in val.inputs["input_ids"].tolist())


def test_uniform_logits_give_log_num_classes_loss(digits, text):
    result = evaluate(Constant(10), digits, "test")
    assert result["count"] == len(digits.splits["test"]) and result["loss"] == pytest.approx(
        math.log(10), abs=1e-6
    )
    result = evaluate(Constant(256), text, "val")
    assert result["count"] == 64 * 63 and result["loss"] == pytest.approx(math.log(256), abs=1e-6)


def test_mlm_masks_fifteen_percent_and_fixes_eval_masks(mlm):
    assert mlm.model_options() == {"vocab_size": 257, "max_positions": 64}
    batch = mlm.train_batch(torch.arange(512), torch.Generator().manual_seed(0))
    ids, labels = batch.inputs["input_ids"], batch.targets
    picked = labels != IGNORE_INDEX
    assert picked.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert (ids[picked] == 256).float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert not (ids[~picked] == 256).any()
    originals = mlm.windows["train"][:512]
    assert torch.equal(labels[picked], originals[picked]) and torch.equal(ids[~picked], originals[~picked])
    same = mlm.train_batch(torch.arange(512), torch.Generator().manual_seed(0))
    other = mlm.train_batch(torch.arange(512), torch.Generator().manual_seed(1))
    assert torch.equal(same.targets, labels) and not torch.equal(other.targets, labels)
    fresh = get_task("text-mlm")
    for split in ("train", "test"):
        assert torch.equal(mlm.eval_batches(split)[0].targets, fresh.eval_batches(split)[0].targets)
    assert (
        evaluate(Constant(257), mlm, "test")["count"] == (mlm.eval_batches("test")[0].targets != -100).sum()
    )


def test_user_task_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("my_tasks:one_hot", n=12)
    assert task.name == "one-hot" and task.num_train == 12

    class Oracle(nn.Module):
        def forward(self, x):
            return 20 * x

    model = Oracle().train()
    result = evaluate(model, task, "test")
    assert result["accuracy"] == 1.0 and result["count"] == 12 and result["loss"] < 1e-6
    assert model.training
    with pytest.raises(ConfigError, match="unknown option 'size'; accepted options: n, classes"):
        get_task("my_tasks:one_hot", size=3)
    with pytest.raises(ConfigError, match="no function 'missing'"):
        get_task("my_tasks:missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        get_task("no_such_module:f")
    with pytest.raises(ConfigError, match="lacks name, kind, num_train"):
        get_task("my_tasks:not_a_task")
    with pytest.raises(ConfigError, match="unknown kind 'regression'; set kind to one of classification"):
        get_task("my_tasks:odd_kind")


def test_unknown_task_and_option_errors_name_the_field():
    assert TASKS == ("digits", "synthetic", "text", "text-mlm")
    with pytest.raises(
        ConfigError, match="unknown task 'digts'; choose one of digits, synthetic, text, text-mlm"
    ):
        get_task("digts")
    with pytest.raises(
        ConfigError, match="unknown option 'seqlen'; accepted options: path, tokens, tokenizer"
    ):
        get_task("text", seqlen=32)


def test_token_id_files_set_the_vocabulary(tmp_path):
    ids = np.arange(2000) % 37
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    for name in ("ids.npy", "ids.txt"):
        task = get_task("text", tokens=tmp_path / name, seq_len=16)
        assert task.model_options() == {"vocab_size": 37, "max_positions": 16}
        assert torch.equal(task.tokens.ids, torch.from_numpy(ids))
    assert (
        get_task("text", tokens=tmp_path / "ids.npy", seq_len=16, vocab_size=40).model_options()["vocab_size"]
        == 40
    )
    assert get_task("text-mlm", tokens=tmp_path / "ids.npy", seq_len=16).model_options()["vocab_size"] == 38
    with pytest.raises(ConfigError, match="vocab_size >= 37"):
        get_task("text", tokens=tmp_path / "ids.npy", vocab_size=10)
    with pytest.raises(ConfigError, match="has 2000 tokens; seq_len=128 needs at least 2560"):
        get_task("text", tokens=tmp_path / "ids.npy", seq_len=128)


def test_missing_and_short_user_files(tmp_path):
    with pytest.raises(MissingPathError, match="nope.txt"):
        get_task("text", path=tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ConfigError, match="has 9 tokens; seq_len=64 needs at least 1280"):
        get_task("text", path=tmp_path / "short.txt")
    (tmp_path / "ok.txt").write_text("é" * 2000)
    assert get_task("text", path=tmp_path / "ok.txt", seq_len=8).decode(torch.tensor([195, 169])) == "é"


def test_local_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    vocab = {w: i for i, w in enumerate(["[UNK]", "[MASK]", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", mask_token="[MASK]").save_pretrained(
        tmp_path / "tok"
    )
    (tmp_path / "corpus.txt").write_text(" ".join(words * 100))
    task = get_task("text", path=tmp_path / "corpus.txt", tokenizer=tmp_path / "tok", seq_len=9)
    assert task.model_options() == {"vocab_size": 10, "max_positions": 9}
    assert task.decode(task.windows["train"][0]) == " ".join(words)
    masked = get_task("text-mlm", path=tmp_path / "corpus.txt", tokenizer=tmp_path / "tok", seq_len=9)
    assert masked.mask_id == 1 and masked.model_options()["vocab_size"] == 10
