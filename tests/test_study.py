"""The reproduction study (python -m pipeline.reproduce): its table recomputed from the runs' metrics, its
figures, TensorBoard logs, and resuming a stopped study without redoing finished runs."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from helpers import SMALL, run_here, run_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import reproduce
from pipeline.submit import main as submit_main
from pipeline.train import metrics

# The quick study on the shard_dir fixture: kn 8 (1x), 32 (4x, with and without warmup), two epochs each.
STUDY_SMALL = [o for o in SMALL if not o.startswith("train.log_every")]


def recomputed_error(run_dir) -> float:
    """A run's reported error, from its metrics.jsonl alone: the median top-1 error of its last 2 epochs (the
    last eval record of each epoch: a resumed run logs an epoch again)."""
    evals = {r["epoch"]: r["top1_err"] for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "eval"}
    return statistics.median([evals[e] for e in sorted(evals)[-2:]])


@pytest.fixture(scope="module")
def study(shard_dir, weird_root):
    out = weird_root / "study"
    args = ["--quick", "--cluster", "local", "--out", str(out), f"data.shards={shard_dir}", *STUDY_SMALL]
    result = run_module("pipeline.reproduce", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args, result


def test_the_quick_studys_table_is_recomputed_from_its_runs_metrics(study):
    out, _, result = study
    table = json.loads((out / "table1.json").read_text())
    assert [r["row"] for r in table["rows"]] == ["1x", "4x", "4x no warmup"]
    assert [(r["kn"], r["peak_lr"]) for r in table["rows"]] == [(8, 0.0125), (32, 0.05), (32, 0.05)]
    for row in table["rows"]:
        (run,) = row["runs"]
        assert run["state"] == "finished"
        assert run["error"] == row["mean"] == recomputed_error(out / "runs" / run["folder"])
        assert f"| {row['row']} | {row['kn']} | {row['peak_lr']:.3g} | {row['mean']:.2f} (1) |" in (out / "table1.md").read_text()
    assert table["rows"][0]["paper_err"] == 23.60 and table["rows"][2]["paper_err"] is None
    for figure in ("fig2.png", "error_vs_kn.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    assert "| 4x no warmup | 32 |" in result.stdout


def test_every_run_folder_is_a_tensorboard_log_of_its_metrics(study):
    out, _, _ = study
    run_dir = out / "runs" / "kn4x-seed0"
    records = metrics.read(run_dir / "metrics.jsonl")
    board = EventAccumulator(str(run_dir))
    board.Reload()
    for tag, kind, key in (("train/top1_err", "train_iter", "train_err"), ("train/lr", "train_iter", "lr"),
                           ("val/top1_err", "eval", "top1_err")):
        want = [(r["step"], r[key]) for r in records if r["_type"] == kind]
        assert [(e.step, e.value) for e in board.Scalars(tag)] == [(s, pytest.approx(v)) for s, v in want]


def test_a_stopped_study_resumes_without_redoing_finished_runs(study):
    """A run that was prepared but had not started when the study stopped is trained; the others are kept."""
    out, args, _ = study
    runs = out / "runs"
    kept = {name: (runs / name / "metrics.jsonl").read_bytes() for name in ("kn1x-seed0", "kn4x-seed0")}
    redo = runs / "kn4x-no-warmup-seed0"
    for name in ("metrics.jsonl", "report.json"):
        (redo / name).unlink()
    shutil.rmtree(redo / "checkpoints")
    result = run_module("pipeline.reproduce", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 3 runs already ended (kept), 1 to train" in result.stdout
    assert "started kn4x-no-warmup-seed0" in result.stdout and "started kn1x" not in result.stdout
    assert {name: (runs / name / "metrics.jsonl").read_bytes() for name in kept} == kept
    table = json.loads((out / "table1.json").read_text())
    assert table["rows"][2]["mean"] == recomputed_error(redo)


def test_several_runs_are_overlaid_in_one_picture(study, capsys):
    out, _, _ = study
    result = run_here(submit_main, capsys, "--report", str(out / "runs" / "kn1x-seed0"), str(out / "runs" / "kn4x-seed0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "runs" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert "the 2 runs overlaid" in result.stdout and "kn1x-seed0: top-1 error" in result.stdout


def test_rows_the_ranks_cannot_make_are_refused_before_anything_runs(tmp_path, capsys):
    code = reproduce.main(["--dry-run", "--cluster", "local", "--gpus-per-node", "3", "--out", str(tmp_path)])
    assert code == 2
    assert "1x (kn=32), 4x (kn=128)" in capsys.readouterr().err
    assert reproduce.main(["--dry-run", "--rows", "1x,2x", "--out", str(tmp_path)]) == 2
    assert "--rows 2x: no such row; valid: 1x, 4x, 16x" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_dry_run_lists_every_run_of_the_default_study(tmp_path, capsys):
    assert reproduce.main(["--dry-run", "--cluster", "local", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 23 and lines[-1].startswith("22 runs in")
    assert lines[0].startswith("kn1x-seed0 (unfinished): world_size=1") and "global_batch=32 " in lines[0]
    assert any(line.startswith("kn128x-seed1 (unfinished)") and "global_batch=4096 " in line for line in lines)
    assert any("kn32x-sqrt-scaling-seed0" in line and "peak_lr=" in line for line in lines)
    assert any(line.startswith("kn128x-lars-seed1 (unfinished)") and "peak_lr=4 (0.25 x 4096/256)" in line
               and "optim=lars schedule=step label_smoothing=0.1" in line for line in lines)
