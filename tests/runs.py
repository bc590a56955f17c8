"""What the tests read back from a run folder: the metrics rows without their timing fields."""

import json
from pathlib import Path

from psi.engine.config import Config

TIMING = ("epoch_seconds", "images_per_second", "eval_seconds", "warmup")  # how long, not what was computed


def only_run(out: Path) -> Path:
    """The one run folder under ``out``."""
    (d,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return d


def metric_rows(run_dir: Path) -> list[dict]:
    """``run_dir``'s metrics.jsonl rows, each without :data:`TIMING`: equal rows mean equal results."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in TIMING:
            r.pop(k)
    return rows


def small_config(tmp_path, **kw) -> Config:
    """A run of seconds on the synthetic set (smallcnn, PSI-SGDM, 2 epochs of 200 images): ``kw`` overrides."""
    base = dict(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=2, batch_size=50, subset=200,
                out=str(tmp_path), progress=False)
    return Config(**{**base, **kw})
