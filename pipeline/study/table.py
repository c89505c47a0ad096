"""Table 1 of the study from its runs' metrics.jsonl: the reported error of every run, mean and std over
seeds per row, the paper's numbers beside them; written as table1.json and table1.md."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline import config
from pipeline.study.design import REPORTED_EPOCHS, StudyRun
from pipeline.train import metrics, report


def run_state(run_dir: Path) -> str:
    """"finished" (its report is written), "diverged" (it stopped at a non-finite loss: rerunning would
    diverge again), or "unfinished"."""
    if (run_dir / "report.json").is_file():
        return "finished"
    if any(r["_type"] == "diverged" for r in metrics.read(run_dir / "metrics.jsonl")):
        return "diverged"
    return "unfinished"


def reported_error(run_dir: Path) -> float:
    """The run's reported top-1 error: the median over its last REPORTED_EPOCHS epochs (paper: last 5)."""
    evals, _ = report.history(run_dir)
    return statistics.median(r["top1_err"] for r in evals[-REPORTED_EPOCHS:])


def build(runs_dir: Path, study: list[StudyRun]) -> dict:
    """The table: per row its kn, peak lr, every seed's reported error (None where a run has not finished
    or diverged), their mean and std (sample std over seeds, as the paper's), and the paper's numbers."""
    rows = {}
    for run in study:
        run_dir = runs_dir / run.folder
        state = run_state(run_dir)
        entry = {"folder": run.folder, "seed": run.seed, "state": state,
                 "error": reported_error(run_dir) if state == "finished" else None}
        row = rows.setdefault(run.row.name, {"row": run.row.name, "multiple": run.row.multiple,
                                             "paper_kn": run.row.paper_kn, "paper_err": run.row.paper_err,
                                             "paper_std": run.row.paper_std, "changes": list(run.row.overrides),
                                             "runs": []})
        if (run_dir / "config.json").is_file() and "kn" not in row:
            _, plan = config.load_run_config(run_dir)
            row.update(kn=plan.global_batch, peak_lr=plan.peak_lr, steps=plan.total_steps)
        row["runs"].append(entry)
    for row in rows.values():
        errors = [r["error"] for r in row["runs"] if r["error"] is not None]
        row["mean"] = statistics.fmean(errors) if errors else None
        row["std"] = statistics.stdev(errors) if len(errors) > 1 else None
    return {"reported_epochs": REPORTED_EPOCHS, "rows": list(rows.values())}


def _cell(mean: float | None, std: float | None, count: int | None = None) -> str:
    """"23.60 ± 0.12", "23.60", or "—"."""
    if mean is None:
        return "—"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({count})" if count is not None else "")


def markdown(table: dict) -> str:
    """The table as Markdown: a row per line, ours beside the paper's."""
    lines = ["| row | kn here | peak lr here | top-1 error here (%) | paper kn | paper top-1 error (%) |",
             "|---|---|---|---|---|---|"]
    for row in table["rows"]:
        done = [r for r in row["runs"] if r["error"] is not None]
        states = [r["state"] for r in row["runs"] if r["state"] != "finished"]
        ours = _cell(row["mean"], row["std"], len(done)) + (f", {', '.join(states)}" if states else "")
        lr = f"{row['peak_lr']:.3g}" if "peak_lr" in row else "—"
        lines.append(f"| {row['row']} | {row.get('kn', '—')} | {lr} | {ours} | {row['paper_kn']} | "
                     f"{_cell(row['paper_err'], row['paper_std'])} |")
    return ("\n".join(lines) + f"\n\nHere: the median top-1 error of each run's last {table['reported_epochs']} "
            "epochs, mean ± sample std over seeds (their count in brackets). Paper: ResNet-50 on ImageNet, the "
            "median of the last 5 epochs, mean ± std over 5 runs (Goyal et al. 2017, Tables 1 and 2).\n")


def write(table: dict, out: Path) -> list[Path]:
    """table1.json and table1.md in out."""
    paths = [out / "table1.json", out / "table1.md"]
    paths[0].write_text(json.dumps(table, indent=2) + "\n")
    paths[1].write_text(markdown(table))
    return paths
