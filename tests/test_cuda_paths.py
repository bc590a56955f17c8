"""The CUDA paths of issue 19, checked on a machine without a GPU (torch.cuda's streams, the copies to the
device and the TF32 switches patched or set by hand; the last test runs only where CUDA is).

Each test names what it would catch: a host wait per batch that no one counted, ``--amp none`` that
convolves in TF32, a run folder that does not say which, an evaluation of the eager model in a compiled
run, decoding workers started again every epoch, PIL-decoded images copied to the GPU from pageable memory.
"""

import contextlib
import json
import math
import warnings

import pytest
import torch
from torch import nn

from psi.engine import cifar, distributed, epoch, imageloader, trainer
from psi.engine.config import Config
from psi.engine.imageloader import ImageLoader
from psi.engine.loaders import load_dataset
from tests.runs import small_config
from tests.test_images import _pil_stand_in, make_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("folder"))  # JPEGs and one PNG per class


@pytest.fixture(scope="module")
def ds():
    return cifar.synthetic(n_train=500, n_test=100)


_cfg = small_config


def _loader(ds, **kw) -> ImageLoader:
    args = dict(train=True, seed=3, image_size=24, workers=0)
    return ImageLoader(ds.train_files, ds.train_y, ds.mean, ds.std, 6, **{**args, **kw})


def _on_host(data, device):
    """The GPU decoder's stand-in, leaving its images where they are (they would be on the GPU already)."""
    return _pil_stand_in(data, torch.device("cpu"))


class _Stream:
    """A CUDA stream's host side, counted."""

    def __init__(self):
        self.syncs = 0

    def synchronize(self):
        self.syncs += 1

    def wait_stream(self, other):
        pass


@pytest.fixture
def training_stream(monkeypatch):
    """torch.cuda's stream calls of the nvjpeg path, patched: the arithmetic stays on the CPU."""
    main = _Stream()
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None, raising=False)
    return main


@pytest.fixture
def tf32_saved():
    """The switches set back after the test. torch's own test helpers (torch.testing._internal, which
    tests/test_conformance.py imports into the same pytest worker) freeze cuDNN's flags for the whole
    process; a user's process has them free, as they are here for the length of the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with getattr(torch.backends, "__allow_nonbracketed_mutation")():
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# -- (4) the nvjpeg loader's host waits: by design, one per batch, counted ---------------------------

def test_the_nvjpeg_loader_waits_on_the_host_once_per_batch_and_counts_it(tree, training_stream):
    ds = load_dataset("imagefolder", tree)
    loader = _loader(ds, decoder="nvjpeg", decode=_on_host)
    loader._stream = side = _Stream()
    n = sum(1 for _ in loader.epoch(0)) + sum(1 for _ in loader.epoch(1, start=1))
    assert n == 7
    assert side.syncs == loader.host_syncs == ImageLoader.SYNCS_PER_BATCH * n == 7
    assert training_stream.syncs == 0  # the training stream is waited for by the device, never by the host
    pil = _loader(ds)
    assert sum(1 for _ in pil.epoch(0)) == 4 and pil.host_syncs == 0  # the PIL path waits for nothing


# -- (5) --amp none is strict fp32 on CUDA, and config.json says what ran ---------------------------

def test_amp_none_on_cuda_switches_tf32_off_for_the_run_and_back_after(tf32_saved):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as a user may have them
    cuda = torch.device("cuda")
    with distributed.tf32_switches(Config(device="cuda", amp="none"), cuda) as state:
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert state == {"cudnn_allow_tf32": False, "cuda_matmul_allow_tf32": False}
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    for cfg, device in ((Config(device="cuda").resolved(), cuda), (Config(amp="none"), torch.device("cpu"))):
        with distributed.tf32_switches(cfg, device) as state:  # bf16 on CUDA, and the CPU: left as they are
            assert state == {"cudnn_allow_tf32": True, "cuda_matmul_allow_tf32": True}


def test_config_json_records_the_tf32_switches_as_the_run_has_them(tmp_path, ds, monkeypatch, tf32_saved):
    """A CPU run records the switches as they are; and the trainer holds the switches over the whole run:
    with them entered as for a CUDA run, training sees TF32 off and config.json says so."""
    cfg = _cfg(tmp_path / "cpu", epochs=1)
    trainer.run(cfg, ds)
    recorded = json.loads((cfg.run_dir() / "config.json").read_text())["tf32"]
    assert recorded == {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}

    torch.backends.cudnn.allow_tf32 = True
    real, seen = distributed.tf32_switches, []
    monkeypatch.setattr(trainer, "tf32_switches", lambda cfg, device: real(cfg, torch.device("cuda")))
    real_epoch = trainer.train_epoch
    monkeypatch.setattr(trainer, "train_epoch", lambda *a: seen.append(torch.backends.cudnn.allow_tf32) or
                        real_epoch(*a))
    cfg = _cfg(tmp_path / "as-cuda", epochs=1, amp="none")
    trainer.run(cfg, ds)
    assert seen == [False] and torch.backends.cudnn.allow_tf32 is True
    recorded = json.loads((cfg.run_dir() / "config.json").read_text())["tf32"]
    assert recorded == {"cudnn_allow_tf32": False, "cuda_matmul_allow_tf32": False}


# -- (6a) a compiled run evaluates its compiled model ------------------------------------------------

class _Compiled(nn.Module):
    """torch.compile's stand-in: a wrapper evaluate must receive (nothing is compiled)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_compiled_run_evaluates_the_compiled_model(tmp_path, ds, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda f, **kw: _Compiled(f) if isinstance(f, nn.Module) else f)
    seen = []
    real = epoch.evaluate
    monkeypatch.setattr(epoch, "evaluate", lambda model, *a: seen.append(type(model).__name__) or real(model, *a))
    trainer.run(_cfg(tmp_path / "compiled", compile=True, optimizer="adam"), ds)
    trainer.run(_cfg(tmp_path / "eager", compile=False, optimizer="adam"), ds)
    assert seen[:2] == ["_Compiled", "_Compiled"]
    assert len(seen) == 4 and "_Compiled" not in seen[2:]


# -- (6b) one set of decoding workers for every epoch ------------------------------------------------

def test_one_dataloader_with_persistent_workers_serves_every_epoch(tree, monkeypatch):
    ds = load_dataset("imagefolder", tree)
    expected = [list(_loader(ds).epoch(e)) for e in (0, 1)]
    made = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *a, **kw):
            made.append(kw.get("persistent_workers"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    loader = _loader(ds, workers=1)
    got = [list(loader.epoch(0)), list(loader.epoch(1)), list(loader.epoch(1, start=2))]
    assert made == [True]
    assert not torch.equal(expected[0][0][0], expected[1][0][0])  # the epochs differ: a stale worker would show
    for want, have in zip([expected[0], expected[1], expected[1][2:]], got, strict=True):
        assert len(want) == len(have)
        for (a, ya), (b, yb) in zip(want, have, strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)


# -- (6c) what nvjpeg's workers decoded with PIL goes to the GPU from pinned memory ----------------

def test_the_nvjpeg_paths_copies_to_the_gpu_are_from_pinned_memory(tree, training_stream, monkeypatch):
    pinned, kept, copies = set(), [], []
    real_to = torch.Tensor.to

    def pin_memory(t):
        p = t.clone()
        pinned.add(p.data_ptr())
        kept.append(p)  # held, so that no later tensor takes its address
        return p

    def to(t, *a, **kw):
        if a and isinstance(a[0], torch.device) and a[0].type == "cuda":  # a copy to the GPU: kept here
            copies.append((tuple(t.shape), t.dtype, t.data_ptr() in pinned, kw.get("non_blocking", False)))
            return t
        return real_to(t, *a, **kw)

    ds = load_dataset("imagefolder", tree)
    loader = _loader(ds, decoder="nvjpeg", decode=_on_host)
    loader._stream, loader.device = _Stream(), torch.device("cuda")
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: t.data_ptr() in pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert sum(1 for _ in loader.epoch(0)) == 4
    real = [c for c in copies if math.prod(c[0])]  # an empty tensor copies nothing
    assert any(len(shape) == 4 and dtype == torch.uint8 for shape, dtype, _, _ in real)  # the PNGs went
    assert all(p and non_blocking for _, _, p, non_blocking in real), real


# -- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or imageloader._torchvision_decoder() is None,
                    reason="needs CUDA and torchvision")
def test_sync_debug_mode_sees_the_nvjpeg_loaders_designed_waits_and_no_other(tree):
    """torch.cuda's sync debug mode over an nvjpeg epoch: exactly SYNCS_PER_BATCH host waits per batch."""
    ds = load_dataset("imagefolder", tree)
    loader = _loader(ds, decoder="nvjpeg", device="cuda")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            n = sum(1 for _ in loader.epoch(0))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    assert n == 4 and loader.host_syncs == ImageLoader.SYNCS_PER_BATCH * n
    assert len(syncs) == loader.host_syncs, syncs
