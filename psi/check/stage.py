"""What a stage of ``python -m psi.check`` knows (its device, toy sizes, seconds, where to write) and its
result so far, written as it goes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


class Stage:
    """What a stage knows (device, toy sizes, seconds, where to write) and its result so far."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.device, self.tiny, self.seconds, self.data_dir = torch.device(a.device), a.tiny, a.seconds, a.data_dir
        self.path, self.work, self.start = Path(a.result), Path(a.work), time.perf_counter()
        self.cuda = self.device.type == "cuda"
        self.result: dict[str, Any] = {}

    def emit(self, **kv: Any) -> None:
        self.result.update(kv)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
