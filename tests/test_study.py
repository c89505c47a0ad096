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
    """A run's reported error, from its metrics.jsonl alone: the median top-1 error of its epochs at the final lr,
    those ending after its last decay (STUDY_SMALL: at 1.5 of 2 epochs, so the second); the last eval record of
    each epoch (a resumed run logs an epoch again)."""
    evals = {r["epoch"]: r["top1_err"] for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "eval"}
    return statistics.median([evals[e] for e in sorted(evals) if e + 1 > 1.5])


@pytest.fixture(scope="module")
def study(shard_dir, weird_root):
    root = weird_root / "study"
    args = ["--quick", "--cluster", "local", "--out", str(root), f"data.shards={shard_dir}", *STUDY_SMALL]
    result = run_module("pipeline.reproduce", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "epochs1", args, result


@pytest.mark.slow
def test_the_quick_studys_table_is_recomputed_from_its_runs_metrics(study):
    """Each run's error from its records, a row's difference from 1x (one seed: no test), and the figures: Fig. 2
    in the budget's folder, Fig. 1 (every budget's) beside it."""
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
    assert all(row["vs_1x"] is None for row in table["rows"]) and table["holds_to"]["row"] == "1x"
    for figure in (out / "fig2.png", out.parent / "fig1.png"):
        assert figure.read_bytes()[:4] == b"\x89PNG"
    assert "| 4x no warmup | 32 |" in result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_several_runs_are_overlaid_in_one_picture(study, capsys):
    out, _, _ = study
    result = run_here(submit_main, capsys, "--report", str(out / "runs" / "kn1x-seed0"), str(out / "runs" / "kn4x-seed0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "runs" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert "the 2 runs overlaid" in result.stdout and "kn1x-seed0: top-1 error" in result.stdout


def test_max_requeues_on_this_machine_is_refused_for_a_study(tmp_path, capsys):
    """A study's local runs are not restarted by themselves: the flag is refused before anything is written."""
    assert reproduce.main(["--cluster", "local", "--max-requeues", "2", "--out", str(tmp_path / "out")]) == 2
    assert "--max-requeues 2 requeues a study's runs on Slurm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rows_the_ranks_cannot_make_are_refused_before_anything_runs(tmp_path, capsys):
    code = reproduce.main(["--dry-run", "--cluster", "local", "--gpus-per-node", "3", "--out", str(tmp_path)])
    assert code == 2
    assert "1x (kn=32 on 3 ranks x train.micro_batch 32), 2x (kn=64 on 3 ranks" in capsys.readouterr().err
    assert reproduce.main(["--dry-run", "--rows", "1x,3x", "--out", str(tmp_path)]) == 2
    assert "--rows 3x: no such row; valid: 1x, 2x, 4x, 8x, 16x" in capsys.readouterr().err
    assert reproduce.main(["--dry-run", "--out", str(tmp_path), "train.seed=4"]) == 2
    assert "train.seed=4: the study sets every run's seed from --seeds; pass --seeds 4," in capsys.readouterr().err
    for bad in ("0,0", "x", "-1"):
        assert reproduce.main(["--dry-run", "--out", str(tmp_path), "--seeds", bad]) == 2
        assert f"--seeds {bad!r}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_seed_list_runs_those_seeds_and_a_count_the_first_ones(tmp_path, capsys):
    for seeds, want in (("3,5", [3, 5]), ("4,", [4]), ("1-2", [1, 2]), ("2", [0, 1])):
        assert reproduce.main(["--dry-run", "--rows", "1x", "--seeds", seeds, "--out", str(tmp_path)]) == 0
        lines = capsys.readouterr().out.splitlines()[:-1]
        assert [line.split()[0] for line in lines] == [f"kn1x-seed{s}" for s in want]
        assert all(f"seed{s}" in line for s, line in zip(want, lines))


def test_the_budgets_scale_the_papers_schedule_and_pick_their_rows(tmp_path, capsys):
    """--epochs 18: the paper's 90 epochs scaled by 1/5 (warmup 1 epoch, decays at 6, 12, 16) and its five rows,
    in OUT/epochs18; the runs' reported error is then the median of epochs 17 and 18 (those after the decay at 16)."""
    from pipeline import config
    from pipeline.study import design, table

    assert reproduce.main(["--dry-run", "--epochs", "18", "--seeds", "1", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["kn1x-seed0", "kn8x-seed0", "kn16x-seed0", "kn32x-seed0",
                                                        "kn32x-no-warmup-seed0"]
    assert f"in {tmp_path / 'epochs18' / 'runs'}" in lines[-1]
    cfg = config.apply_overrides(config.preset("study"), design.schedule_overrides(18))
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.milestones) == (18, 1.0, (6.0, 12.0, 16.0))
    assert table.final_lr_epochs(cfg) == 2
    six = config.apply_overrides(config.preset("study"), design.schedule_overrides(6))
    assert six == config.preset("study") and table.final_lr_epochs(six) == 1


def test_the_dry_run_lists_every_run_of_the_default_study(tmp_path, capsys):
    assert reproduce.main(["--dry-run", "--cluster", "local", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 43 and lines[-1].startswith("42 runs in")  # 14 rows x 3 seeds
    assert lines[0].startswith("kn1x-seed0 (unfinished): world_size=1") and "global_batch=32 " in lines[0]
    assert any(line.startswith("kn128x-seed2 (unfinished)") and "global_batch=4096 " in line for line in lines)
    assert any(line.startswith("kn32x-on-4-ranks-seed0 (unfinished): world_size=4") and
               "global_batch=1024 (32/gpu x 4 x accum 8)" in line for line in lines)
    assert any("kn32x-sqrt-scaling-seed0" in line and "peak_lr=" in line for line in lines)
    assert any(line.startswith("kn128x-lars-seed1 (unfinished)") and "peak_lr=4 (0.25 x 4096/256)" in line
               and "optim=lars schedule=step label_smoothing=0.1" in line for line in lines)
