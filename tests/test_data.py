"""psi.engine.cifar: every source in its documented order, errors that say what to do, the loader."""

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psi.engine import cifar
from psi.engine.cifar import CIFAR10_CLASSES, BatchLoader
from psi.engine.dataset import DataError, balanced_subset, split_validation
from psi.engine.loaders import load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_official(root: Path, name: str, n: int = 20, tar: bool = False) -> None:
    """Small files in the official python format (the real ones are 170 MB)."""
    rng = np.random.default_rng(0)
    c10 = name == "cifar10"
    top = root / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    top.mkdir(parents=True)
    key = "labels" if c10 else "fine_labels"
    k = 10 if c10 else 100
    files = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    for f in files + ["test_batch" if c10 else "test"]:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, k, n))}
        (top / f).write_bytes(pickle.dumps(d))
    meta = {"label_names": list(CIFAR10_CLASSES)} if c10 else {"fine_label_names": [f"c{i:02d}" for i in range(100)]}
    (top / ("batches.meta" if c10 else "meta")).write_bytes(pickle.dumps(meta))
    if tar:
        with tarfile.open(root / ("cifar-10-python.tar.gz" if c10 else "cifar-100-python.tar.gz"), "w:gz") as t:
            t.add(top, arcname=top.name)
        for f in top.iterdir():
            f.unlink()
        top.rmdir()


def _write_tree(root: Path, per_class: int = 2, as_tar: str | None = None) -> None:
    rng = np.random.default_rng(1)
    base = root / "tree"
    for split in ("train", "test"):
        for c in reversed(CIFAR10_CLASSES):  # written out of order on purpose
            (base / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(base / split / c / f"{i}.png")
    if as_tar:
        with tarfile.open(root / as_tar, "w:gz") as t:
            t.add(base, arcname="whatever")
        import shutil

        shutil.rmtree(base)


@pytest.mark.parametrize("tar", [False, True])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_format(tmp_path, name, tar):
    _write_official(tmp_path, name, tar=tar)
    ds = load_dataset(name, tmp_path, download=False)
    n_train = 100 if name == "cifar10" else 20
    assert ds.train_x.shape == (n_train, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 3, 32, 32) and ds.num_classes == (10 if name == "cifar10" else 100)
    assert ds.source.endswith(".tar.gz") == tar


def test_the_official_archive_is_closed_once_read(tmp_path, monkeypatch):
    _write_official(tmp_path, "cifar10", tar=True)
    opened, real_open = [], tarfile.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(cifar.tarfile, "open", spy)
    load_dataset("cifar10", tmp_path, download=False)
    assert opened and all(t.closed for t in opened)


@pytest.mark.parametrize("as_tar", [None, "some-name.tar.gz"])
def test_image_tree_keeps_official_order_and_is_cached(tmp_path, monkeypatch, as_tar):
    monkeypatch.setenv("PSI_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path, as_tar=as_tar)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_y.tolist() == [i for i in range(10) for _ in range(2)]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(again.train_x, ds.train_x)


def test_the_cache_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """Two processes may decode the same source at once (two suites, two runs): while one writes, no
    reader sees a cache file, and a write that fails leaves nothing behind."""
    monkeypatch.setenv("PSI_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path)
    real, seen = cifar.np.savez, []

    def savez(f, **arrays):
        seen.append(sorted(p.name for p in (tmp_path / "cache").iterdir()))
        real(f, **arrays)

    monkeypatch.setattr(cifar.np, "savez", savez)
    load_dataset("cifar10", tmp_path, download=False)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].endswith(".tmp")  # its own name, not *.npz
    (cache,) = (tmp_path / "cache").iterdir()
    cache.unlink()

    def full(f, **arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cifar.np, "savez", full)
    with pytest.raises(DataError, match="No space"):
        load_dataset("cifar10", tmp_path, download=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PSI_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=False)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    assert torch.equal(load_dataset("cifar10", tmp_path, download=False).train_x, ds.train_x)


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "--data-dir" in msg and "PSI_DATA" in msg


def test_corrupt_archive_is_named(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(DataError, match="unreadable"):
        load_dataset("cifar10", tmp_path, download=False)


def test_interrupted_or_wrong_download_leaves_nothing(tmp_path, monkeypatch):
    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: Resp(b"x" * 1000))
    with pytest.raises(DataError, match="md5"):
        load_dataset("cifar10", tmp_path, download=True)
    assert os.listdir(tmp_path) == []


def test_synthetic_only_by_name(tmp_path):
    assert load_dataset("synthetic").name == "synthetic"
    with pytest.raises(ValueError, match="valid: cifar10, cifar100, synthetic"):
        load_dataset("cifar11", tmp_path)


def test_balanced_subset_and_validation_split():
    y = torch.arange(1000) % 10
    idx = balanced_subset(y, 100)
    assert torch.equal(torch.bincount(y[idx]), torch.full((10,), 10))
    assert torch.equal(idx, balanced_subset(y, 100))
    train, val = split_validation(y, 200)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 1000
    with pytest.raises(ValueError, match="multiple"):
        balanced_subset(y, 55)


def test_loader_is_seeded_per_epoch_and_augments():
    ds = cifar.synthetic(n_train=256, n_test=64)
    mk = lambda: BatchLoader(ds.train_x, ds.train_y, ds.mean, ds.std, 64, train=True, seed=3)  # noqa: E731
    a, b = list(mk().epoch(2)), list(mk().epoch(2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = list(mk().epoch(3))
    assert not torch.equal(a[0][0], c[0][0])
    x, y = a[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.5
    # eval batches: in order, not augmented, and the last partial batch kept
    ev = list(BatchLoader(ds.test_x, ds.test_y, ds.mean, ds.std, 50, train=False).epoch(0))
    assert [len(y) for _, y in ev] == [50, 14] and torch.equal(torch.cat([y for _, y in ev]), ds.test_y)


def test_an_epoch_started_at_a_batch_gives_the_rest_of_that_epoch():
    """A run resumed inside an epoch (SIGTERM) starts at the next batch: the batches before are drawn
    from the epoch's generator, not made, so the rest are the same images and augmentations."""
    ds = cifar.synthetic(n_train=256, n_test=64)
    mk = lambda: BatchLoader(ds.train_x, ds.train_y, ds.mean, ds.std, 64, train=True, seed=3)  # noqa: E731
    whole, rest = list(mk().epoch(2)), list(mk().epoch(2, start=3))
    assert len(rest) == 1 and torch.equal(rest[0][0], whole[3][0]) and torch.equal(rest[0][1], whole[3][1])


def test_loader_slices_for_data_parallel():
    ds = cifar.synthetic(n_train=128, n_test=10)
    full = list(BatchLoader(ds.train_x, ds.train_y, ds.mean, ds.std, 32, train=True, seed=1).epoch(0))
    parts = [list(BatchLoader(ds.train_x, ds.train_y, ds.mean, ds.std, 32, train=True, seed=1, rank=r,
                                world=2).epoch(0)) for r in (0, 1)]
    for (x, _), (x0, _), (x1, _) in zip(full, *parts):
        assert torch.equal(x, torch.cat([x0, x1]))


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").is_file(), reason="needs ../shared/data")
def test_real_cifar10_from_a_folder_holding_only_the_jpeg_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("PSI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cifar10-jpeg.tar.gz").symlink_to(SHARED / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("PSI_DATA", str(tmp_path / "d"))
    ds = load_dataset("cifar10")
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 5000))
    mean = ds.train_x.double().mean((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([125.27, 122.93, 113.86], dtype=torch.float64), atol=0.02, rtol=0)
