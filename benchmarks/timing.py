"""What the benchmarks share: interleaved timed rounds, and the JSON they leave behind."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def interleaved_rounds(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every run in every round; the runs alternate within a round so drift hits them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    return seconds


def write_result(path: Path, result: dict) -> None:
    """The benchmark's numbers as JSON at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
