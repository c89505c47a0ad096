"""The end-of-run report: numbers from metrics.jsonl into report.json, a PNG of the curves, and a summary."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.config import load_run_config
from pipeline.train import metrics, noise
from pipeline.train.schedule import lr_at


def _latest(records: list[dict], kind: str, key: str) -> list[dict]:
    """Records of one kind, the last one for each value of key, in key order.

    A resumed run trains its unfinished epoch again and logs it again; the later records are the real ones.
    """
    return sorted({r[key]: r for r in records if r["_type"] == kind}.values(), key=lambda r: r[key])


def history(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(eval records by epoch, train_iter records by step) of a run, the last record of each."""
    path = Path(run_dir) / "metrics.jsonl"
    records = metrics.read(path)
    evals = _latest(records, "eval", "epoch")
    if not evals:
        raise ValueError(f"{path} holds no eval record; the run has not finished an epoch")
    return evals, _latest(records, "train_iter", "step")


def summarize(evals: list[dict], iters: list[dict]) -> dict:
    """Final and median-of-last-5 top-1 error (the paper's reported number), time, throughput."""
    last5 = [r["top1_err"] for r in evals[-5:]]
    return {
        "epochs": len(evals),
        "final_top1_err": evals[-1]["top1_err"],
        "final_top5_err": evals[-1]["top5_err"],
        "median_last5_top1_err": statistics.median(last5),
        "best_top1_err": min(r["top1_err"] for r in evals),
        "num_val_samples": evals[-1]["num_samples"],
        "train_s": sum(r["epoch_s"] for r in evals),  # training + evaluation, without queue waits or restarts
        "img_s": statistics.median(r["img_s"] for r in iters) if iters else None,
        "steps": evals[-1]["step"],
        # the gradient noise scale (pipeline.train.noise) in the first, second and last third of training
        "noise_scale": noise.over_training(iters),
    }


def pyplot():
    """matplotlib's pyplot drawing into files only (clusters have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epochs_of(evals: list[dict], iters: list[dict]) -> list[float]:
    """The epoch (fractional) at which each train_iter record was written."""
    steps_per_epoch = evals[0]["step"] / (evals[0]["epoch"] + 1)
    return [r["step"] / steps_per_epoch for r in iters]


def schedule(run_dir: Path) -> tuple[list[float], list[float]]:
    """(epochs, lr) of the run's schedule from its config.json: every step of the warmup, then at most about
    2,000 steps, so that the picture shows the warmup that records every train.log_every steps would skip."""
    cfg, plan = load_run_config(run_dir)
    every = max(1, plan.total_steps // 2000)
    steps = sorted(set(range(min(plan.warmup_steps + 1, plan.total_steps))) | set(range(0, plan.total_steps, every))
                   | {plan.total_steps - 1})
    return ([step / plan.steps_per_epoch for step in steps],
            [lr_at(step, cfg.optim.base_lr, plan, cfg.schedule) for step in steps])


def plot(run_dir: Path, evals: list[dict], iters: list[dict], path: Path) -> None:
    """The run's picture, as a PNG at path: what a large-batch run is checked by first (overlay() draws the
    same panels for several runs)."""
    overlay_runs([("", evals, iters, schedule(run_dir))], path)


def overlay(run_dirs: list[Path], path: Path) -> None:
    """The picture of several runs in one PNG at path, a line per run named by its folder."""
    overlay_runs([(Path(d).name, *history(d), schedule(d)) for d in run_dirs], path)


def overlay_runs(runs: list[tuple[str, list[dict], list[dict], tuple[list[float], list[float]]]], path: Path) -> None:
    """Three panels against epochs: the learning rate (the schedule's line, its warmup and decays, and the
    rate each record logged as dots), the training error of each record's window against the validation top-1
    error (the loss for runs logged before train_err existed), and images/s with the share of time rank 0
    waited for data."""
    plt = pyplot()
    fig, (ax_lr, ax_err, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_wait = ax_speed.twinx()
    for number, (name, evals, iters, (lr_epochs, lrs)) in enumerate(runs):
        color, label = f"C{number}", f"{name}: " if name else ""
        epochs = epochs_of(evals, iters)
        ax_lr.plot(lr_epochs, lrs, color=color, label=f"{label}schedule")
        ax_lr.plot(epochs, [r["lr"] for r in iters], color=color, marker=".", linestyle="none",
                   label=f"{label}logged")
        key = "train_err" if iters and all("train_err" in r for r in iters) else "loss"
        ax_err.plot(epochs, [r[key] for r in iters], color=color, alpha=0.6,
                    label=f"{label}training {'error' if key == 'train_err' else 'loss'}")
        ax_err.plot([r["epoch"] + 1 for r in evals], [r["top1_err"] for r in evals], color=color, marker="o",
                    label=f"{label}validation top-1 error")
        ax_speed.plot(epochs, [r["img_s"] for r in iters], color=color, label=f"{label}images/s")
        if iters and all("data_wait" in r for r in iters):
            ax_wait.plot(epochs, [100 * r["data_wait"] for r in iters], color=color, linestyle=":",
                         label=f"{label}waiting for data")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (warmup, decays)")
    ax_err.set(xlabel="epoch", ylabel="error (%)", yscale="log", title="training against validation error")
    ax_speed.set(xlabel="epoch", ylabel="images/s", title="speed, and the time spent waiting for data")
    ax_wait.set(ylabel="waiting for data (% of the time)", ylim=(0, 100))
    ax_err.legend(fontsize="small")
    handles = [h for ax in (ax_speed, ax_wait) for h in ax.get_legend_handles_labels()[0]]
    ax_speed.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="lower right")
    ax_lr.legend(fontsize="small")
    for ax in (ax_lr, ax_err, ax_speed):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(summary: dict, run_dir: Path) -> str:
    """The summary in one line."""
    speed = f"{summary['img_s']:.0f} img/s" if summary["img_s"] else "no train_iter records"
    scale = summary.get("noise_scale")
    if scale:
        speed += "; gradient noise scale " + " / ".join(f"{scale[k]:.0f}" if scale[k] is not None else "-"
                                                       for k in ("early", "middle", "late")) + " (early / middle / late)"
    return (f"top-1 error {summary['final_top1_err']:.2f}% (median {summary['median_last5_top1_err']:.2f}% over the "
            f"last {min(5, summary['epochs'])} epochs), top-5 {summary['final_top5_err']:.2f}% on "
            f"{summary['num_val_samples']} images after {summary['epochs']} epochs; "
            f"{metrics.duration(summary['train_s'])} training, {speed}; plot {Path(run_dir) / 'curves.png'}")


def write(run_dir: Path) -> str:
    """Write report.json and curves.png into the run folder; return the summary line."""
    evals, iters = history(run_dir)
    summary = summarize(evals, iters)
    (Path(run_dir) / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(run_dir, evals, iters, Path(run_dir) / "curves.png")
    return describe(summary, run_dir)


def read(run_dir: Path) -> str:
    """The summary line of the report.json that the run wrote at its end."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has not finished; "
                                f"python -m pipeline.submit --report {run_dir} writes it from the metrics so far")
    return describe(json.loads(path.read_text()), run_dir)
