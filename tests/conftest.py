import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """psi.engine.cifar's decoding cache in this session's (this xdist worker's) temporary folder, for the tests
    and every process they start: never the project's data/psi-cache, which another copy of the suite
    (or a real run) may be writing. Tests that look at the cache set their own (monkeypatch)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PSI_CACHE", str(tmp_path_factory.getbasetemp() / "psi-cache"))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
