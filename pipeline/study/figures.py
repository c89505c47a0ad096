"""The study's figures from its runs' metrics.jsonl: training error against epochs (the paper's Fig. 2) and
error against kn (its Fig. 1)."""

from __future__ import annotations

import statistics
from pathlib import Path

from pipeline.study import design
from pipeline.study.design import StudyRun
from pipeline.study.table import run_state
from pipeline.train import report

# Fig. 2 of the paper: the reference kn and 32x it, with and without warmup.
FIG2_ROWS = ("1x", "32x", "32x no warmup", "4x", "4x no warmup")


def mean_curve(run_dirs: list[Path]) -> tuple[list[float], list[float]]:
    """(epochs, training error %) averaged over the runs (seeds of one row log at the same steps)."""
    curves = []
    for run_dir in run_dirs:
        evals, iters = report.history(run_dir)
        curves.append(dict(zip(report.epochs_of(evals, iters), (r["train_err"] for r in iters))))
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return epochs, [statistics.fmean(c[e] for c in curves) for e in epochs]


def fig2(runs_dir: Path, study: list[StudyRun], path: Path) -> None:
    """Training error against epochs of the reference kn and of 32x with and without warmup, each the mean
    over its finished seeds, overlaid (the paper's Fig. 2)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tops = []
    for name in FIG2_ROWS:
        dirs = [runs_dir / r.folder for r in study if r.row.name == name and run_state(runs_dir / r.folder) == "finished"]
        if dirs:
            epochs, errors = mean_curve(dirs)
            kn = next(r for r in study if r.row.name == name).row.paper_kn
            ax.plot(epochs, errors, label=f"{name} (the paper's {kn}), {len(dirs)} seeds")
            tops += [e for x, e in zip(epochs, errors) if x > 1]
    ax.set(xlabel="epoch", ylabel="training error (%)", title="training error, mean over seeds (cf. Goyal et al. Fig. 2)",
           ylim=(0, min(100, 1.5 * max(tops))) if tops else None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def error_vs_kn(table: dict, path: Path) -> None:
    """Top-1 error against kn of the linear-scaling, gradual-warmup rows: ours (mean ± std over seeds) and
    the paper's, on two y axes (the paper's Fig. 1); and ours with LARS and label smoothing, where run."""
    plt = report.pyplot()
    rows = [r for r in table["rows"] if not r["changes"] and r["mean"] is not None]
    lars = [r for r in table["rows"] if tuple(r["changes"]) == design.LARS and r["mean"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([r["multiple"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] or 0 for r in rows],
                marker="o", capsize=3, color="C0", label="here")
    if lars:
        ax.errorbar([r["multiple"] for r in lars], [r["mean"] for r in lars], yerr=[r["std"] or 0 for r in lars],
                    marker="^", capsize=3, color="C2", label="here, LARS + label smoothing")
    ax.set(xscale="log", xlabel="kn / reference kn (the paper's 256)", ylabel="top-1 error here (%)",
           title="validation error against minibatch size (cf. Goyal et al. Fig. 1)")
    ax.set_xticks([r["multiple"] for r in rows], [f"{r['multiple']}x\n{r.get('kn', '')} ({r['paper_kn']})" for r in rows])
    paper = [r for r in rows if r["paper_err"] is not None]
    twin = ax.twinx()
    twin.errorbar([r["multiple"] for r in paper], [r["paper_err"] for r in paper], yerr=[r["paper_std"] or 0 for r in paper],
                  marker="s", capsize=3, color="C1", linestyle="--", label="paper (ResNet-50, ImageNet)")
    twin.set_ylabel("top-1 error, paper (%)")
    (ours, ours_label), (theirs, theirs_label) = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(ours + theirs, ours_label + theirs_label, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
