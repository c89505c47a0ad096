"""The end-of-run report: numbers from metrics.jsonl into report.json, a PNG of the curves, and a summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; clusters have no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline import metrics  # noqa: E402


def summarize(run_dir: Path) -> dict:
    """Final and median-of-last-5 top-1 error (the paper's reported number), time, throughput."""
    records = metrics.read(Path(run_dir) / "metrics.jsonl")
    evals = [r for r in records if r["_type"] == "eval"]
    iters = [r for r in records if r["_type"] == "train_iter"]
    starts = [r for r in records if r["_type"] == "start"]
    if not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no eval record yet; the run has not finished an epoch")
    last5 = [r["top1_err"] for r in evals[-5:]]
    return {
        "epochs": len(evals),
        "final_top1_err": evals[-1]["top1_err"],
        "final_top5_err": evals[-1]["top5_err"],
        "median_last5_top1_err": statistics.median(last5),
        "best_top1_err": min(r["top1_err"] for r in evals),
        "num_val_samples": evals[-1]["num_samples"],
        "wall_s": evals[-1]["time"] - (starts[0]["time"] if starts else evals[0]["time"] - evals[0]["epoch_s"]),
        "img_s": statistics.median(r["img_s"] for r in iters) if iters else None,
        "steps": evals[-1]["step"],
    }


def plot(run_dir: Path) -> Path:
    """curves.png: training loss and validation error against epochs."""
    records = metrics.read(Path(run_dir) / "metrics.jsonl")
    evals = [r for r in records if r["_type"] == "eval"]
    iters = [r for r in records if r["_type"] == "train_iter"]
    steps_per_epoch = evals[0]["step"] / (evals[0]["epoch"] + 1) if evals else 1
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] / steps_per_epoch for r in iters], [r["loss"] for r in iters])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    epochs = [r["epoch"] + 1 for r in evals]
    ax_err.plot(epochs, [r["top1_err"] for r in evals], marker="o", label="top-1")
    ax_err.plot(epochs, [r["top5_err"] for r in evals], marker="o", label="top-5")
    ax_err.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    ax_err.legend()
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(run_dir: Path) -> str:
    """Write report.json and curves.png into the run folder; return the summary text."""
    summary = summarize(run_dir)
    (Path(run_dir) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = plot(run_dir)
    speed = f"{summary['img_s']:.0f} img/s" if summary["img_s"] else "no train_iter records"
    return (f"top-1 error {summary['final_top1_err']:.2f}% (median "
            f"{summary['median_last5_top1_err']:.2f}% over the last {min(5, summary['epochs'])} epochs), top-5 {summary['final_top5_err']:.2f}% on "
            f"{summary['num_val_samples']} images after {summary['epochs']} epochs; "
            f"{metrics.duration(summary['wall_s'])} wall, {speed}; plot {png}")
