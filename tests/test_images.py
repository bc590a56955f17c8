"""psi.engine.images and the engine on image folders: layouts, errors, transforms, the loader, the CLI, resume
after kill -9, torchrun, the ImageNet preset. Every image is made here (a few dozen small JPEGs)."""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psi.engine import distributed, imageloader, trainer
from psi.engine.config import Config, lr_factor, optimizer_for
from psi.engine.dataset import DataError
from psi.engine.distributed import (
    _sees_token,
    default_workers,
)
from psi.engine.epoch import evaluate
from psi.engine.imageloader import ImageLoader, _decode_pil, eval_box, resolve_decoder, train_box
from psi.engine.loaders import load_dataset
from psi.train import _parser, configs_from_args, parse_args
from tests.procs import env, kill_at_epoch, rendezvous_store, torchrun, torchrun_script
from tests.runs import metric_rows, only_run

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["n01440764", "n01443537", "n01484850"]  # WordNet ids, so that the same tree serves --dataset imagenet


def _image(rng: np.random.Generator, c: int, w: int, h: int) -> Image.Image:
    """A class-coloured gradient with noise: learnable, and different everywhere (crops matter)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / w), (yy * 255 / h), np.full((h, w), 80.0 * c)], -1)
    return Image.fromarray((0.7 * base + 0.3 * rng.random((h, w, 3)) * 255).astype(np.uint8))


def make_tree(root: Path, n_train: int = 8, n_val: int = 2, flat_val: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                w, h = (40 + 8 * (i % 3), 32 + 6 * (i % 2))  # sizes and aspect ratios vary
                if split == "val" and flat_val:
                    path = root / "val" / f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG"
                else:
                    path = root / split / name / f"{i}.{'png' if i == 1 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, c, w, h).save(path)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _image(rng, c, 48, 40).save(root / split / name / f"{i}.jpg", quality=95)
    return root


# -- layouts and their errors --------------------------------------------------------------------

def test_image_folder_lists_every_file_with_its_class(tree):
    ds = load_dataset("imagefolder", tree)
    assert ds.classes == tuple(CLASSES) and ds.num_classes == 3
    assert len(ds.train_files) == 24 and len(ds.test_files) == 6
    for f, y in zip(ds.train_files, ds.train_y.tolist(), strict=True):
        assert Path(f).parent.name == CLASSES[y]
    assert any(str(f).endswith(".png") for f in ds.train_files)  # PNG and JPEG alike


def test_a_folder_one_level_down_is_found(tree, tmp_path):
    (tmp_path / "mine").symlink_to(tree)
    assert len(load_dataset("imagefolder", tmp_path).train_files) == 24


def test_missing_folder_and_missing_splits_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data-dir"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no train/ split"):
        load_dataset("imagefolder", tmp_path / "x")
    make_tree(tmp_path / "y")
    for f in (tmp_path / "y" / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((tmp_path / "y" / "val").glob("*"), reverse=True):
        d.rmdir()
    (tmp_path / "y" / "val").rmdir()
    with pytest.raises(DataError, match="no val/ \\(nor test/\\) split"):
        load_dataset("imagefolder", tmp_path / "y")


def test_an_empty_class_and_a_class_unknown_to_train_are_named(tmp_path):
    root = make_tree(tmp_path / "a")
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match="no .* image in .*train: n09999999"):
        load_dataset("imagefolder", root)
    root = make_tree(tmp_path / "b")
    (root / "val" / "stray").mkdir()
    _image(np.random.default_rng(0), 0, 8, 8).save(root / "val" / "stray" / "0.jpg")
    with pytest.raises(DataError, match="class folders that train/ lacks: stray"):
        load_dataset("imagefolder", root)


def test_imagenet_needs_wordnet_ids(tmp_path):
    root = make_tree(tmp_path / "a")
    (root / "train" / CLASSES[0]).rename(root / "train" / "cat")
    with pytest.raises(DataError):  # no folder like n######## : not an ImageNet train split
        load_dataset("imagenet", root)


def test_imagenet_flat_validation_with_kaggle_labels(tmp_path):
    root = make_tree(tmp_path, flat_val=True)
    with pytest.raises(DataError, match="no label file was found"):
        load_dataset("imagenet", root)
    stems = sorted(p.stem for p in (root / "val").iterdir())
    with open(root / "LOC_val_solution.csv", "w") as f:
        f.write("ImageId,PredictionString\n")
        for k, s in enumerate(stems):
            f.write(f"{s},{CLASSES[k // 2]} 1 2 3 4\n")
    ds = load_dataset("imagenet", root)
    assert [Path(p).stem for p in ds.test_files] == stems and ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_flat_validation_with_the_official_devkit(tmp_path):
    """The devkit's ground truth holds ILSVRC2012_IDs (here 3, 1, 2: not the sorted order); meta.mat maps
    them to WordNet ids, as in the real devkit (leaf synsets: num_children 0)."""
    from scipy.io import savemat

    root = make_tree(tmp_path, flat_val=True)
    ids = {CLASSES[0]: 3, CLASSES[1]: 1, CLASSES[2]: 2}
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for k, (wnid, i) in enumerate([*ids.items(), ("n00000001", 4)]):
        synsets[k] = (i, wnid, wnid, 0 if k < 3 else 3)  # the fourth is an inner node: not a class
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    truth = "".join(f"{ids[CLASSES[k // 2]]}\n" for k in range(6)).encode()
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        for name, payload in (("meta.mat", buf.getvalue()), ("ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert load_dataset("imagenet", root).test_y.tolist() == [0, 0, 1, 1, 2, 2]


# -- transforms ----------------------------------------------------------------------------------

def test_random_resized_crop_boxes_follow_torchvisions_rule():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        (left, top, right, bottom), _ = train_box(500, 375, rng)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        areas.append((right - left) * (bottom - top) / (500 * 375))
        ratios.append((right - left) / (bottom - top))
    assert 0.075 <= min(areas) and max(areas) <= 1.0 and 0.3 < np.median(areas) < 0.7
    assert 0.7 < min(ratios) and max(ratios) < 1.4
    assert train_box(10, 1000, rng)[0] == (0, 493, 10, 506)  # no try fits: the centre crop, height round(10/(3/4))
    assert eval_box(500, 375, 224) == (85.9375, 23.4375, 414.0625, 351.5625)  # 256 then 224: a side of 375 * 0.875


def test_draft_decoding_matches_a_full_decode(tmp_path):
    """PIL's draft decodes a large JPEG at 1/2..1/8; the box must be rescaled with it (if it were not, the
    crop would land elsewhere and the images would differ by far more than JPEG's own downscaling)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.jpg"
    img = _image(rng, 1, 640, 480).resize((640, 480))
    img.save(path, quality=95)
    box, size = (100, 80, 420, 400), 40
    drafted = _decode_pil(str(path), lambda w, h: (box, False), size).astype(float)
    with Image.open(path) as full:
        reference = np.asarray(full.convert("RGB").resize((size, size), Image.BILINEAR, box=box)).astype(float)
    assert np.abs(drafted - reference).mean() < 4  # out of 255
    shifted = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR,
                                                                box=(0, 0, 320, 320))).astype(float)
    assert np.abs(shifted - reference).mean() > 12  # what a misplaced box would give


# -- the loader ----------------------------------------------------------------------------------

def _loader(ds, **kw):
    args = dict(train=True, seed=3, image_size=24, workers=0)
    return ImageLoader(ds.train_files, ds.train_y, ds.mean, ds.std, 6, **{**args, **kw})


def test_batches_depend_on_seed_and_epoch_only(tree):
    ds = load_dataset("imagefolder", tree)
    serial = list(_loader(ds).epoch(1))
    parallel = list(_loader(ds, workers=2).epoch(1))
    assert len(serial) == 4 and serial[0][0].shape == (6, 3, 24, 24) and serial[0][0].dtype == torch.float32
    for (a, ya), (b, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other = list(_loader(ds).epoch(2))
    assert not torch.equal(serial[0][0], other[0][0])
    assert abs(float(torch.cat([x for x, _ in serial]).mean())) < 1.5  # normalised


def test_an_epoch_started_at_a_batch_gives_the_rest_of_that_epoch(tree):
    """A run resumed inside an epoch (SIGTERM) starts its loader at the next batch: the same batches."""
    ds = load_dataset("imagefolder", tree)
    whole, rest = list(_loader(ds).epoch(1)), list(_loader(ds).epoch(1, start=2))
    assert len(rest) == len(whole) - 2
    for (a, ya), (b, yb) in zip(whole[2:], rest, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_the_processes_slices_make_one_processs_batch(tree):
    ds = load_dataset("imagefolder", tree)
    whole = list(_loader(ds).epoch(0))
    halves = [list(_loader(ds, rank=r, world=2).epoch(0)) for r in (0, 1)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), x)
        assert torch.equal(torch.cat([halves[0][b][1], halves[1][b][1]]), y)
    ev = [ImageLoader(ds.test_files, ds.test_y, ds.mean, ds.std, 4, train=False, image_size=24, rank=r, world=2)
          for r in (0, 1)]
    seen = sorted(i for e in ev for s in e._slices(0) for i in s.tolist())
    assert seen == list(range(6))  # the evaluation's last, short batch is split too, nothing twice


def _pil_stand_in(data, device):
    """torchvision.io.decode_jpeg's contract ((3, H, W) uint8 on ``device``), by PIL: the GPU path on the CPU."""
    return [torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)
            .to(device) for d in data]


def test_the_gpu_decoding_path_gives_the_same_images(jpeg_tree):
    ds = load_dataset("imagefolder", jpeg_tree)
    pil = list(_loader(ds).epoch(0))
    gpu_path = _loader(ds, decoder="nvjpeg", decode=_pil_stand_in)
    assert gpu_path.decoder == "nvjpeg"
    for (a, ya), (b, yb) in zip(pil, gpu_path.epoch(0), strict=True):
        assert torch.equal(ya, yb) and a.shape == b.shape
        assert (a - b).abs().mean() < 0.05  # same crops and flips; only the resampling differs slightly
    flipped = [(x.flip(3) - b).abs().mean() for (x, _), (b, _) in zip(pil, gpu_path.epoch(0), strict=True)]
    assert max(flipped) > 0.2  # a lost flip or a shifted crop would show at this size


def test_the_decoder_is_chosen_and_refused_with_reasons(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decoder("auto", cpu) == "pil"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_decoder("nvjpeg", cpu)
    monkeypatch.setattr(imageloader, "_torchvision_decoder", lambda: None)
    assert resolve_decoder("auto", cuda) == "pil"
    with pytest.raises(ValueError, match="torchvision"):
        resolve_decoder("nvjpeg", cuda)
    monkeypatch.setattr(imageloader, "_torchvision_decoder", lambda: _pil_stand_in)
    assert resolve_decoder("auto", cuda) == "nvjpeg"
    assert Config(dataset="imagefolder", device="cuda").resolved().decoder == "nvjpeg"  # PNGs or not


# -- the engine ----------------------------------------------------------------------------------

def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psi.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PSI_PROGRESS": "0", "OMP_NUM_THREADS": "1"})


def _rows(out: Path) -> list[dict]:
    return metric_rows(only_run(out))


def _args(tree: Path, *extra: str) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "resnet18", "--batch-size", "8",
            "--image-size", "32", "--workers", "1", "--threads", "1", "--quiet", *extra]


def test_resnet18_trains_on_a_folder_and_resumes_after_kill_9(tree, tmp_path):
    args = _args(tree, "--epochs", "4", "--optimizer", "psi-sgdm")
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    (summary,) = list((tmp_path / "whole").glob("*/summary.json"))
    s = json.loads(summary.read_text())
    assert s["epochs"] == 4 and 0 <= s["final_test_acc"] <= 1 and s["data_source"] == str(tree)
    config = json.loads((summary.parent / "config.json").read_text())
    assert config["image_size"] == 32 and config["decoder"] == "pil" and config["model"] == "resnet18"
    # killed in epoch 1, after its first step (its decoding workers with it): one epoch on disk
    kill_at_epoch([*args, "--out", str(tmp_path / "cut")], 1, tmp_path / "cut.log")
    assert len(_rows(tmp_path / "cut")) == 1
    assert _cli(*args, "--out", str(tmp_path / "cut")).returncode == 0
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")


def test_two_torchrun_processes_equal_one_on_a_folder(tree, tmp_path):
    """gloo, 2 CPU processes, each decoding its half of every batch and evaluating its half of the
    validation images == one process with BN statistics per half (--bn-split 2)."""
    args = _args(tree, "--epochs", "2", "--optimizer", "psi-sgdm")
    r = subprocess.run([*torchrun(2), "-m", "psi.train", *args, "--out", str(tmp_path / "ddp")], cwd=ROOT,
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"run"') == 1  # rank 0 reports
    assert _cli(*args, "--bn-split", "2", "--out", str(tmp_path / "one")).returncode == 0
    ddp, one = _rows(tmp_path / "ddp"), _rows(tmp_path / "one")
    assert [x["train_loss"] for x in ddp] == pytest.approx([x["train_loss"] for x in one], rel=1e-5)
    # the evaluation, split over the two processes and summed, is rank 0's model on every validation image
    from psi.engine.models import resnet18

    model = resnet18(num_classes=3)
    model.load_state_dict(torch.load(next((tmp_path / "ddp").glob("*/checkpoint.pt")), weights_only=True)["model"])
    ds = load_dataset("imagefolder", tree)
    whole = ImageLoader(ds.test_files, ds.test_y, ds.mean, ds.std, 8, train=False, image_size=32)
    loss, acc = evaluate(model, whole, lambda: contextlib.nullcontext())
    assert (ddp[-1]["test_loss"], ddp[-1]["test_acc"]) == pytest.approx((loss, acc), rel=1e-6)


def test_the_imagenet_preset_and_the_learning_rate_rule():
    ap = _parser()
    a = parse_args(ap, ["--preset", "imagenet", "--data-dir", "x"])
    (cfg,) = configs_from_args(a)
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.milestones, cfg.gamma) == ("imagenet", "resnet18", 100,
                                                                               (0.3, 0.6, 0.9), 0.2)
    assert (cfg.batch_size, cfg.image_size, cfg.lr_scaling) == (128, 224, "linear")
    assert [e for e in range(100) if lr_factor(cfg, e) != lr_factor(cfg, e - 1)] == [30, 60, 90]
    (wide,) = configs_from_args(parse_args(_parser(), ["--preset", "imagenet", "--batch-size",
                                                                          "1024", "--model", "resnet50"]))
    assert (wide.batch_size, wide.model, wide.epochs) == (1024, "resnet50", 100)  # the command line wins
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    x = torch.randn(4, 3, 6, 6)
    model(x)
    lrs = [g["lr"] for g in optimizer_for(wide, model, x).param_groups]
    assert lrs == pytest.approx([0.1 * 8, 0.1 * 8])  # PSI-SGDM's 0.1 and the rest's 0.1, times 1024/128
    base = [g["lr"] for g in optimizer_for(Config(), model, x).param_groups]
    assert base == pytest.approx([0.1, 0.1])


def test_image_options_are_refused_on_cifar_and_cifar_keys_do_not_move():
    with pytest.raises(ValueError, match="image_size is for the image datasets"):
        Config(dataset="cifar10", image_size=64).validate()
    # the run folders of CIFAR runs made before image_size/decoder/lr_scaling existed keep their names
    # (the keys below are what the engine of commit f3beb1d computed)
    assert Config().key() == "3016ac06"
    assert Config(dataset="cifar100", model="resnet56", optimizer="sgd", seed=3, setting="table2",
                        device="cuda").key() == "f421a8c1"
    assert Config(lr_scaling="linear").key() != "3016ac06"  # ... and a new setting does move them


def test_a_run_folder_that_is_not_shared_is_refused(tmp_path):
    """Across machines rank 0's run folder must be every rank's: rank 1 here looks at another folder (as a
    node without the shared file system would) and the run stops on every rank with the fix named."""
    script = f"""
from pathlib import Path
from psi.engine import distributed
distributed.SHARED_FOLDER_PATIENCE = 0.5  # rank 1 never sees the token: no need to look for a minute
rank = dist.get_rank()
out = Path({str(tmp_path)!r}) / f"node{{rank}}"
out.mkdir(parents=True, exist_ok=True)
try:
    distributed.check_shared_folder(out, rank, 2)
except RuntimeError as e:
    print("refused:", e)
"""
    r = torchrun_script(tmp_path / "check.py", script)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused:") == 2 and "file system that all nodes share" in r.stdout


def test_training_images_per_second_is_reported(tree, tmp_path):
    """In process (workers=0), batch 10 of 24 images: 2 full batches, the last 4 images dropped, and the
    rate counts the 20 images trained on; the evaluation sees all 6 validation images."""
    cfg = Config(dataset="imagefolder", data_dir=str(tree), model="resnet18", optimizer="sgd", epochs=1,
                       batch_size=10, image_size=32, workers=0, out=str(tmp_path), progress=False)
    s = trainer.run(cfg)
    (row,) = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert row["images_per_second"] == pytest.approx(20 / row["epoch_seconds"]) and math.isfinite(s["final_train_loss"])
    assert round(row["test_acc"] * 6) == pytest.approx(row["test_acc"] * 6)  # a whole number of the 6 images


def test_the_grid_trains_imagenet_runs_data_parallel_and_table1_takes_them(tree, tmp_path):
    """``psi.grid run --procs-per-run 2``: each run of the grid under torchrun (2 gloo processes here,
    2 GPUs each on a GPU machine); the runs land in Table 1's ImageNet rows, which leave "not run"."""
    from psi.study import results

    sets = ["dataset='imagenet'", "models=['resnet18']", "optimizers=['sgd', 'psi-sgd']", "seeds=[0]", "lr_grids={}",
            "batch_size=8", "subset=0", "epochs=1", "image_size=32"]
    cmd = [sys.executable, "-m", "psi.grid", "run", "--profile", "imagenet", "--out", str(tmp_path), "--data-dir",
           str(tree), "--device", "cpu", "--workers", "1", "--procs-per-run", "2", "--refresh", "0.5"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/summary.json")]
    assert len(summaries) == 2 and {s["world_size"] for s in summaries} == {2}
    runs = results.load_runs(tmp_path / "runs")
    table = results.compare(runs[runs.split == "test"])
    assert sorted(table.paper_mean) == [67.72, 70.38]  # Table 1, ImageNet ResNet-18: SGD and PSI-SGD
    missing = results.not_run(runs)
    done = missing[(missing.dataset == "imagenet") & (missing.model == "resnet18")]
    assert sorted(done.optimizer) == ["adam", "psi-sgdm", "sgdg"]  # the two that ran are no longer "not run"


def test_worker_slots_deal_gpus_per_run():
    from psi.grid.workers import worker_command, worker_slots

    assert worker_slots("0,1,2,3", 1, 1, 2) == ["0,1", "2,3"]
    assert worker_slots("0,1", 2, 1) == ["0", "1", "0", "1"]
    assert worker_slots(None, 1, 3) == [None, None, None]
    with pytest.raises(ValueError, match="groups of 4"):
        worker_slots("0,1,2", 1, 1, 4)
    cmd = worker_command(Path("plan.json"), 2, 4, 8, steal=False, procs_per_run=8)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8"]
    assert cmd[-1] == "--no-steal" and "2/4" in cmd


def test_the_gpu_path_takes_pngs_and_cmyk_jpegs_through_pil_in_the_workers(tree, tmp_path):
    """A folder of JPEGs, PNGs and a CMYK JPEG under nvjpeg: the GPU decoder sees only RGB/grey JPEGs
    (nvjpeg rejects or miscolours the others), and the batches are the PIL path's, in order."""
    shutil.copytree(tree, tmp_path / "tree")  # the module's tree stays as it is
    ds = load_dataset("imagefolder", tmp_path / "tree")
    cmyk = Path(ds.train_files[2])
    Image.open(cmyk).convert("CMYK").save(cmyk, format="JPEG")
    seen = []

    def stand_in(data, device):
        for d in data:
            img = Image.open(io.BytesIO(d.numpy().tobytes()))
            seen.append((img.format, img.mode))
        return _pil_stand_in(data, device)

    pil = list(_loader(ds, workers=1).epoch(0))
    gpu_path = list(_loader(ds, decoder="nvjpeg", decode=stand_in, workers=1).epoch(0))
    assert seen and set(seen) == {("JPEG", "RGB")}  # no PNG, no CMYK reached it
    assert len(seen) == sum(1 for f in ds.train_files if str(f).endswith(".jpg")) - 1
    for (a, ya), (b, yb) in zip(pil, gpu_path, strict=True):
        assert torch.equal(ya, yb) and (a - b).abs().mean() < 0.05


def test_a_large_batch_of_files_keeps_file_descriptors_few(tmp_path):
    """nvjpeg's worker items hold a batch's bytes in one tensor: one file descriptor per batch crossing
    from a worker, not one per image (with 300 images per batch and 256 descriptors allowed, one per
    image runs out: 'Too many open files')."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        (tmp_path / "val" / f"c{c}").mkdir(parents=True)
        _image(rng, c, 8, 8).save(tmp_path / "val" / f"c{c}" / "0.jpg")
        for i in range(150):
            _image(rng, c, 12, 10).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg")
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from psi.engine.imageloader import ImageLoader
from psi.engine.loaders import load_dataset
from test_images import _pil_stand_in
ds = load_dataset("imagefolder", {str(tmp_path)!r})
loader = ImageLoader(ds.train_files, ds.train_y, ds.mean, ds.std, 300, train=True, image_size=8, workers=1,
                       decoder="nvjpeg", decode=_pil_stand_in)
print(sum(len(x) for x, _ in loader.epoch(0)))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["300"], r.stderr[-2000:]


def test_a_jpeg_the_gpu_decoder_refuses_is_decoded_by_pil(jpeg_tree):
    """nvjpeg refuses some JPEGs (CMYK ones, in ILSVRC-2012): the batch falls back image by image, and an
    image that fails alone is decoded by PIL; the batches are the PIL path's."""
    ds = load_dataset("imagefolder", jpeg_tree)
    refused = {Path(ds.train_files[i]).read_bytes() for i in range(0, 24, 5)}
    calls = []

    def picky(data, device):
        calls.append(len(data))
        if any(d.numpy().tobytes() in refused for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return _pil_stand_in(data, device)

    pil = list(_loader(ds).epoch(0))
    gpu_path = list(_loader(ds, decoder="nvjpeg", decode=picky).epoch(0))
    assert calls.count(6) == 4 and calls.count(1) == 6 * sum(  # a batch with a refused image goes one by one
        any(ds.train_files[i] for i in s.tolist() if Path(ds.train_files[i]).read_bytes() in refused)
        for s in _loader(ds)._slices(0))
    for (a, _), (b, _) in zip(pil, gpu_path, strict=True):
        assert (a - b).abs().mean() < 0.05


def test_default_workers_share_the_cpus(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("PSI_WORKER_CPUS", "8")
    assert default_workers(1) == 7  # one CPU left for the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(4) == 1
    monkeypatch.setenv("PSI_WORKER_CPUS", "64")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(1) == 8  # at most 8


def test_two_nodes_with_c10d_rendezvous_equal_one_process(tree, tmp_path):
    """The multi-machine command of docs/imagenet.md (torchrun --nnodes 2 --rdzv-backend c10d), both "nodes" on
    this machine, one process each, sharing the run folder: one process's results (BN per half)."""
    args = _args(tree, "--epochs", "1", "--optimizer", "psi-sgd")
    with rendezvous_store() as rdzv:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *rdzv]
        nodes = [subprocess.Popen([*launcher, "-m", "psi.train", *args, "--out", str(tmp_path / "ddp")], cwd=ROOT,
                                  env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(e[-1500:] for _, e in outs)
    assert _cli(*args, "--bn-split", "2", "--out", str(tmp_path / "one")).returncode == 0
    (summary,) = list((tmp_path / "ddp").glob("*/summary.json"))
    assert json.loads(summary.read_text())["world_size"] == 2
    assert [x["train_loss"] for x in _rows(tmp_path / "ddp")] == pytest.approx(
        [x["train_loss"] for x in _rows(tmp_path / "one")], rel=1e-5)


def test_nodes_with_different_copies_of_the_dataset_are_refused(tree, tmp_path):
    """Each node may list its own copy: one image fewer on rank 1 would give it one step fewer per epoch
    (and DDP would wait forever); the run stops on every rank, naming each one's count."""
    other = tmp_path / "copy"
    shutil.copytree(tree, other)
    next((other / "train" / CLASSES[0]).glob("*.jpg")).unlink()
    script = f"""
from psi.engine.dataset import DataError
from psi.engine.distributed import check_same_files
from psi.engine.loaders import load_dataset
rank = dist.get_rank()
ds = load_dataset("imagefolder", {str(tree)!r} if rank == 0 else {str(other)!r})
try:
    check_same_files(ds, 2)
    print("accepted")
except DataError as e:
    print("refused:", e)
"""
    r = torchrun_script(tmp_path / "check.py", script)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused:") == 2 and "24 training" in r.stdout and "23 training" in r.stdout


def test_a_slow_shared_file_system_is_waited_for(tmp_path, monkeypatch):
    """NFS may say "no such file" for a while after another node created it: a rank keeps looking, once
    a second, for as long as its patience lasts. On a clock of the test's own: the token "arrives"
    during the second wait, and no assertion depends on how fast this machine is."""
    path = tmp_path / "run" / ".world"
    clock, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        clock[0] += seconds
        if len(waits) == 2:
            path.write_text(json.dumps({"token": "t"}))

    monkeypatch.setattr(distributed, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    assert not _sees_token(path, "t", patience=0) and waits == []  # rank 0 looks once, never waits
    path.parent.mkdir()
    assert _sees_token(path, "t", patience=10) and waits == [1.0, 1.0]  # seen on the third look
    waits.clear()
    assert not _sees_token(path, "other", patience=3) and sum(waits) == 3.0  # gives up when patience ends


def test_a_data_parallel_grid_worker_agrees_on_a_run_rank_0_finishes_late(tree, tmp_path):
    """Rank 0 writes a run's summary after the others leave the run (here 1 s late, as on a slow file
    system): the worker's processes must still take the same runs (rank 1 alone in a collective would
    fail or hang)."""
    script = f"""
import time
from pathlib import Path
from psi.engine import distributed, imageloader, trainer
from psi.grid.workers import plan_file, work
from psi.study.plan import base_config, distinct, study_configs
from psi.study.profiles import study_settings
write = trainer.write_json
def late(path, obj):
    if path.name == "summary.json":
        time.sleep(1.0)
    write(path, obj)
trainer.write_json = late
settings = study_settings("imagenet", models=["resnet18"], optimizers=["sgd", "psi-sgd"], seeds=[0],
                                   epochs=1, batch_size=8, image_size=32)
base = base_config(settings, {str(tmp_path / "runs")!r}, data_dir={str(tree)!r})
configs = distinct(study_configs(settings, base, {{}}))
plan = plan_file(Path({str(tmp_path)!r}), "study", "", settings, base, configs)
sys.exit(work(plan, (1, 1), threads=1, steal=False))
"""
    r = torchrun_script(tmp_path / "worker.py", script, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "runs").glob("*/summary.json"))) == 2


def test_the_gpu_path_decodes_on_its_own_stream_that_training_then_waits_for(jpeg_tree, monkeypatch):
    """The stream protocol of the nvjpeg path, with torch.cuda's stream calls patched to record what they
    are asked (the arithmetic stays on the CPU): the loader's stream finishes its last batch before
    nvjpeg writes again, the decode runs on that stream, the training stream waits for it, and the
    batch is marked as used by the training stream. Leaving out any one line turns this red."""
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            log.append(f"{self.name}.synchronize")

        def wait_stream(self, other):
            log.append(f"{self.name}.wait_stream({other.name})")

    current = [Stream("main")]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(f"record_stream({s.name})"),
                        raising=False)

    def decode(data, device):
        log.append(f"decode on {current[-1].name}")
        return _pil_stand_in(data, device)

    ds = load_dataset("imagefolder", jpeg_tree)
    loader = _loader(ds, decoder="nvjpeg", decode=decode)
    loader._stream = Stream("side")
    batches = list(loader.epoch(0))
    assert len(batches) == 4
    assert log == ["side.synchronize", "decode on side", "main.wait_stream(side)", "record_stream(main)"] * 4


def _marked(mark: str) -> list[int]:
    """The live processes whose environment holds ``mark`` (a run's fork server and workers inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark.encode() in (d / "environ").read_bytes() and (d / "stat").read_text().split()[2] != "Z":
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_decoding_workers_end_when_their_run_is_killed(tree, tmp_path):
    """The workers come from a fork server, so torch's own check (is my parent alive?) watches the server,
    and the server lives while a worker holds its pipe: after kill -9 of the run both lived on for ever
    (225 MB each, found after this suite's kill -9 tests). They must end within seconds."""
    mark = f"PSI_TEST_RUN={uuid.uuid4().hex}"
    script = f"""
import sys
from psi.engine.imageloader import ImageLoader
from psi.engine.loaders import load_dataset
ds = load_dataset("imagefolder", {str(tree)!r})
loader = ImageLoader(ds.train_files, ds.train_y, ds.mean, ds.std, 8, train=True, image_size=16, workers=2)
for x, y in loader.epoch(0):
    print("batch", flush=True)
    sys.stdin.readline()  # held here, workers alive, until the test kills this process
"""
    name, value = mark.split("=")
    run = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env={**env(), name: value})
    try:
        assert run.stdout.readline().strip() == "batch"
        assert len(_marked(mark)) >= 4  # the run, the fork server, two workers
        run.kill()
        run.wait()
        for _ in range(300):  # every worker checks each second; a generous bound, not a timing assertion
            if not _marked(mark):
                break
            time.sleep(0.1)
        assert _marked(mark) == [], "decoding workers outlived their run"
    finally:
        run.kill()
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)
