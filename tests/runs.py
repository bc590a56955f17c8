"""What the tests read back from a run folder: the metrics rows without their timing fields."""

import json
from pathlib import Path

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
