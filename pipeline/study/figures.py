"""The study's figures from its runs' metrics.jsonl and tables: training error against epochs (the paper's
Fig. 2) and the difference in error from 1x against kn at every budget beside the paper's (its Fig. 1)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline import config
from pipeline.study.design import StudyRun
from pipeline.study.table import REFERENCE_ROW, run_state
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
    over its finished seeds, overlaid (the paper's Fig. 2), on a log axis that keeps the warmup's errors near
    chance and the last epochs' in view; the warmup epochs shaded."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    warmup = None
    for name in FIG2_ROWS:
        dirs = [runs_dir / r.folder for r in study if r.row.name == name and run_state(runs_dir / r.folder) == "finished"]
        if dirs:
            epochs, errors = mean_curve(dirs)
            kn = next(r for r in study if r.row.name == name).row.paper_kn
            ax.plot(epochs, errors, label=f"{name} (the paper's {kn}), {len(dirs)} seed{'s' if len(dirs) != 1 else ''}")
            cfg, _ = config.load_run_config(dirs[0])
            warmup = warmup or cfg.schedule.warmup_epochs
    if warmup:
        ax.axvspan(0, warmup, color="0.9", label=f"warmup ({warmup:.3g} epochs)")
    ax.set(xlabel="epoch", ylabel="training error (%)", yscale="log", xlim=(0, None),
           title="training error, mean over seeds (cf. Goyal et al. Fig. 2)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fig1(tables: dict[int, dict], path: Path) -> None:
    """The difference in top-1 error from 1x against kn (as a multiple of the reference) of the linear-scaling
    rows: ours at each budget (epochs -> table) with 95 % intervals, and the paper's from its Table 1, on one
    axis (symmetric-log: the points near 0 and the climb both in view); the gradient noise scale measured early
    in the 1x runs marked on the kn axis, with the middle and late values in its label (the paper's Fig. 1, as
    differences)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    reference_batch, paper, multiples = None, None, set()
    for number, (epochs, table) in enumerate(sorted(tables.items())):
        rows = sorted((r for r in table["rows"] if not r["changes"] and r["mean"] is not None), key=lambda r: r["multiple"])
        base = next((r for r in rows if r["row"] == REFERENCE_ROW), None)
        if base is None:
            continue
        reference_batch = base.get("kn", reference_batch)
        paper = paper or [r for r in table["rows"] if not r["changes"]]
        multiples |= {r["multiple"] for r in rows}
        diffs = [0.0 if r is base else (r["vs_1x"]["diff"] if r["vs_1x"] else r["mean"] - base["mean"]) for r in rows]
        low = [0.0 if r is base or not r["vs_1x"] else d - r["vs_1x"]["ci95"][0] for r, d in zip(rows, diffs)]
        high = [0.0 if r is base or not r["vs_1x"] else r["vs_1x"]["ci95"][1] - d for r, d in zip(rows, diffs)]
        ax.errorbar([r["multiple"] for r in rows], diffs, yerr=[low, high], marker="o", capsize=3, color=f"C{number}",
                    label=f"here, {epochs} epochs (95 % intervals)")
        scale = base.get("noise_scale")
        if scale and reference_batch and scale["early"] is not None:
            later = ", ".join(f"{part} {scale[part]:.0f}" for part in ("middle", "late") if scale[part] is not None)
            ax.axvline(scale["early"] / reference_batch, color=f"C{number}", linestyle=":",
                       label=f"noise scale of 1x at {epochs} epochs, early: {scale['early']:.0f} images ({later})")
    if paper:
        rows = [r for r in paper if r["paper_err"] is not None]
        base = next(r for r in rows if r["row"] == REFERENCE_ROW)
        intervals = [r["paper_ci95"] or [0.0, 0.0] for r in rows]
        diffs = [r["paper_err"] - base["paper_err"] for r in rows]
        ax.errorbar([r["multiple"] for r in rows], diffs,
                    yerr=[[d - i[0] for d, i in zip(diffs, intervals)], [i[1] - d for d, i in zip(diffs, intervals)]],
                    marker="s", capsize=3, color="k", linestyle="--", label="paper, 90 epochs (ResNet-50, ImageNet)")
        multiples |= {r["multiple"] for r in rows}
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set(xscale="log", xlabel=f"kn / reference kn (here {reference_batch} images; the paper's 256)",
           ylabel="top-1 error minus 1x's (points)",
           title="error against minibatch size, as the difference from 1x (cf. Goyal et al. Fig. 1)")
    ax.set_yscale("symlog", linthresh=1)
    if paper:
        kn = {r["multiple"]: r["paper_kn"] for r in paper}
        ax.set_xticks(sorted(multiples), [f"{m}x\n{kn.get(m, '')}" for m in sorted(multiples)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_tables(out: Path) -> dict[int, dict]:
    """Every budget's table1.json in the study folder out (out/epochs<E>/), by its epochs."""
    tables = {}
    for path in sorted(out.glob("epochs*/table1.json")):
        table = json.loads(path.read_text())
        if table.get("epochs"):
            tables[table["epochs"]] = table
    return tables
