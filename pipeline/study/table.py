"""Table 1 of the study from its runs' metrics.jsonl: the reported error of every run, mean and std over
seeds per row, each row against 1x of the same budget (Welch's t-test and the 95 % interval of the
difference), kn* (how far linear scaling holds), the gradient noise scale measured in the runs, and the
paper's numbers beside them; written as table1.json and table1.md."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline import config
from pipeline.study.design import StudyRun
from pipeline.train import metrics, noise, report

REFERENCE_ROW = "1x"
CONFIDENCE = 0.95


def run_state(run_dir: Path) -> str:
    """"finished" (its report is written), "diverged" (it stopped at a non-finite loss: rerunning would
    diverge again), or "unfinished"."""
    if (run_dir / "report.json").is_file():
        return "finished"
    if any(r["_type"] == "diverged" for r in metrics.read(run_dir / "metrics.jsonl")):
        return "diverged"
    return "unfinished"


def final_lr_epochs(cfg: config.Config) -> int:
    """How many of a run's last epochs trained at its final lr (the paper reports the median of its last 5 of
    the 10 after its last decay at 80): those ending after the last step decay; one (the last) where the lr
    never settles (cosine, poly) or no decay falls within the run."""
    last = max((m for m in cfg.schedule.milestones if m < cfg.schedule.epochs), default=None)
    if cfg.schedule.kind != "step" or last is None:
        return 1
    return sum(1 for end in range(1, cfg.schedule.epochs + 1) if end > last)


def reported_error(run_dir: Path) -> float:
    """The run's reported top-1 error: the median over its last epochs at the final lr (final_lr_epochs)."""
    evals, _ = report.history(run_dir)
    cfg, _ = config.load_run_config(run_dir)
    return statistics.median(r["top1_err"] for r in evals[-final_lr_epochs(cfg):])


def welch(errors: list[float], reference: list[float]) -> dict | None:
    """Welch's t-test of mean(errors) - mean(reference): the difference, its 95 % interval and the two-sided
    p-value; None with fewer than 2 runs on either side or no spread at all."""
    if len(errors) < 2 or len(reference) < 2 or (statistics.stdev(errors) == 0 and statistics.stdev(reference) == 0):
        return None
    from scipy import stats  # imported here: only a study's table needs it

    test = stats.ttest_ind(errors, reference, equal_var=False)
    low, high = test.confidence_interval(CONFIDENCE)
    return {"diff": statistics.fmean(errors) - statistics.fmean(reference), "ci95": [float(low), float(high)],
            "p": float(test.pvalue), "df": float(test.df)}


def paper_interval(row: dict, reference: dict) -> list[float] | None:
    """The 95 % interval of the paper's difference from its 256 (Welch, from its mean ± std over 5 runs)."""
    if row["paper_std"] is None or reference["paper_std"] is None:
        return None
    from scipy import stats

    runs = 5
    a, b = row["paper_std"] ** 2 / runs, reference["paper_std"] ** 2 / runs
    df = (a + b) ** 2 / (a ** 2 / (runs - 1) + b ** 2 / (runs - 1))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, df) * math.sqrt(a + b)
    diff = row["paper_err"] - reference["paper_err"]
    return [diff - half, diff + half]


def noise_scale(run_dirs: list[Path]) -> dict | None:
    """The gradient noise scale early, in the middle and late in training (pipeline.train.noise), each the
    mean over the runs that measured it, in images; None where none did (runs from before it was measured)."""
    parts = [noise.over_training(report.history(d)[1]) for d in run_dirs]
    parts = [p for p in parts if p]
    if not parts:
        return None
    out = {k: statistics.fmean(p[k] for p in parts if p[k] is not None) if any(p[k] is not None for p in parts)
           else None for k in ("early", "middle", "late")}
    return {**out, "runs": len(parts), "pairing": parts[-1]["pairing"]}


def holds_to(rows: list[dict]) -> dict | None:
    """kn*: the largest kn of the linear-scaling rows (no other change, the study's ranks) up to which every
    row's difference from 1x is within the 95 % interval of zero or below (not measurably worse), decided
    before the runs; "open" where the next row has too few finished seeds for a test (kn* is then at least
    that); None without a 1x row."""
    plain = sorted((r for r in rows if not r["changes"]), key=lambda r: r["multiple"])
    if not plain or plain[0]["row"] != REFERENCE_ROW or plain[0]["mean"] is None:
        return None
    star, open_at = plain[0], None
    for row in plain[1:]:
        if row["vs_1x"] is None:
            open_at = row["row"]
            break
        if row["vs_1x"]["ci95"][0] > 0:
            break
        star = row
    return {"row": star["row"], "multiple": star["multiple"], "kn": star.get("kn"), "open": open_at}


def build(runs_dir: Path, study: list[StudyRun]) -> dict:
    """The table: per row its kn, peak lr, every seed's reported error (None where a run has not finished
    or diverged), their mean and std (sample std over seeds, as the paper's), the difference from 1x with
    its test, the noise scale measured in its runs and the paper's numbers; and kn*."""
    rows = {}
    epochs = None
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
            cfg, plan = config.load_run_config(run_dir)
            row.update(kn=plan.global_batch, peak_lr=plan.peak_lr, steps=plan.total_steps, ranks=plan.world_size)
            epochs = epochs or cfg.schedule.epochs
        row["runs"].append(entry)
    for row in rows.values():
        errors = [r["error"] for r in row["runs"] if r["error"] is not None]
        row["mean"] = statistics.fmean(errors) if errors else None
        row["std"] = statistics.stdev(errors) if len(errors) > 1 else None
        row["noise_scale"] = noise_scale([runs_dir / r["folder"] for r in row["runs"] if r["state"] == "finished"])
    reference = rows.get(REFERENCE_ROW)
    base = [r["error"] for r in reference["runs"] if r["error"] is not None] if reference else []
    for row in rows.values():
        errors = [r["error"] for r in row["runs"] if r["error"] is not None]
        row["vs_1x"] = welch(errors, base) if reference and row is not reference else None
        row["paper_ci95"] = (paper_interval(row, reference) if reference and row is not reference
                             and row["paper_err"] is not None else None)
    table = {"epochs": epochs, "confidence": CONFIDENCE, "rows": list(rows.values())}
    table["holds_to"] = holds_to(table["rows"])
    return table


def _cell(mean: float | None, std: float | None, count: int | None = None) -> str:
    """"23.60 ± 0.12", "23.60", or "—"."""
    if mean is None:
        return "—"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({count})" if count is not None else "")


def _versus(test: dict | None) -> str:
    """"+2.93 [+2.41, +3.45], p=0.001" or "—"."""
    if test is None:
        return "—"
    low, high = test["ci95"]
    return f"{test['diff']:+.2f} [{low:+.2f}, {high:+.2f}], p={test['p']:.2g}"


def rows_markdown(table: dict) -> str:
    """The table's rows as Markdown, ours beside the paper's."""
    lines = ["| row | kn here | peak lr here | top-1 error here (%) | vs 1x: difference [95 % interval], Welch p | "
             "noise scale here: early / middle / late | paper kn | paper top-1 error (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        done = [r for r in row["runs"] if r["error"] is not None]
        states = [r["state"] for r in row["runs"] if r["state"] != "finished"]
        ours = _cell(row["mean"], row["std"], len(done)) + (f", {', '.join(states)}" if states else "")
        lr = f"{row['peak_lr']:.3g}" if "peak_lr" in row else "—"
        scale = row["noise_scale"]
        scale = " / ".join(f"{scale[k]:.0f}" if scale[k] is not None else "—" for k in ("early", "middle", "late")) \
            if scale else "—"
        lines.append(f"| {row['row']} | {row.get('kn', '—')} | {lr} | {ours} | {_versus(row['vs_1x'])} | {scale} | "
                     f"{row['paper_kn']} | {_cell(row['paper_err'], row['paper_std'])} |")
    return "\n".join(lines)


def verdict(table: dict) -> str:
    """kn* in a sentence."""
    star = table["holds_to"]
    epochs = f"{table['epochs']} epochs" if table["epochs"] else "this budget"
    if not star:
        return "kn*: not yet (1x has not finished)."
    if star["open"]:
        return (f"kn* at {epochs}: not decided yet, at least {star['kn']} ({star['row']}); {star['open']} has fewer than "
                "2 finished seeds, too few for the test.")
    return (f"Linear scaling holds to kn* = {star['kn']} ({star['row']}) at {epochs}: the largest kn up to which no "
            "linear-scaling row is measurably worse than 1x (the 95 % interval of its difference reaches 0).")


def markdown(table: dict) -> str:
    """The table as Markdown: its rows, kn*, and what the columns are."""
    return (rows_markdown(table) + f"\n\n{verdict(table)}\n\nHere: the median top-1 error of each run's last epochs "
            "at the final lr, mean ± sample std over seeds (their count in brackets); the difference from 1x of the "
            "same budget with the 95 % interval and p-value of Welch's t-test; the gradient noise scale B_simple "
            "(images) in the first, second and last third of the row's runs (mean over seeds). Paper: ResNet-50 on ImageNet, the median of the last 5 "
            "epochs, mean ± std over 5 runs (Goyal et al. 2017, Tables 1 and 2).\n")


def write(table: dict, out: Path) -> list[Path]:
    """table1.json and table1.md in out."""
    paths = [out / "table1.json", out / "table1.md"]
    paths[0].write_text(json.dumps(table, indent=2) + "\n")
    paths[1].write_text(markdown(table))
    return paths
