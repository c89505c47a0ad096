"""The main job end to end: python -m pipeline.submit through submitit's local executor, 2 gloo ranks."""

import json
import os
import subprocess
import sys

import pytest

from pipeline import metrics

SMALL = ["data.train_samples=240", "data.val_samples=70", "data.workers=1", "train.micro_batch=8",
         "train.log_every=5", "schedule.epochs=2", "schedule.milestones=1.5"]


def submit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.submit", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def run(shard_dir, weird_root):
    run_dir = weird_root / "run one"
    args = ["--cluster", "local", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL]
    result = submit(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, args, result


def test_run_folder_holds_config_metrics_checkpoints_and_report(run):
    run_dir, _, result = run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["plan"]["global_batch"] == 16 and saved["plan"]["steps_per_epoch"] == 15
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0
    records = metrics.read(run_dir / "metrics.jsonl")
    iters = [r for r in records if r["_type"] == "train_iter"]
    evals = [r for r in records if r["_type"] == "eval"]
    assert [r["step"] for r in iters] == [5, 10, 15, 20, 25, 30]
    assert {"step", "epoch", "lr", "loss", "img_s"} <= set(iters[0])
    assert [r["epoch"] for r in evals] == [0, 1]
    assert all(r["num_samples"] == 70 for r in evals)
    assert {"top1_err", "top5_err"} <= set(evals[0])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-002"
    assert (run_dir / "curves.png").stat().st_size > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs"] == 2 and report["final_top1_err"] == evals[-1]["top1_err"]
    assert list((run_dir / "submitit").glob("*_1_log.err"))  # both ranks logged
    assert "epoch 2/2 done" in result.stdout and "top-1 error" in result.stdout


def test_lr_follows_the_plan_through_the_engine(run):
    run_dir, _, _ = run
    iters = [r for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "train_iter"]
    # demo: base 0.05 per 32, kn=16 <= 32 so no warmup: 0.025, x0.1 from epoch 1.5 (step 22.5)
    assert [round(r["lr"], 6) for r in iters] == [0.025, 0.025, 0.025, 0.025, 0.0025, 0.0025]


def test_same_command_resumes_and_a_changed_config_is_refused(run):
    run_dir, args, _ = run
    again = submit(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from epoch-002" in again.stdout
    changed = submit(*args, "optim.base_lr=0.2")
    assert changed.returncode == 2 and "holds a different config" in changed.stderr


def test_missing_shards_fail_before_anything_is_submitted(tmp_path):
    result = submit("--cluster", "local", "--run-dir", str(tmp_path / "run"), f"data.shards={tmp_path}", *SMALL)
    assert result.returncode == 2
    assert "python -m pipeline.shards convert" in result.stderr
    assert not (tmp_path / "run").exists()


def test_debug_cluster_refuses_several_ranks(shard_dir, tmp_path):
    result = submit("--cluster", "debug", "--run-dir", str(tmp_path / "run"), f"data.shards={shard_dir}", *SMALL)
    assert result.returncode == 2 and "world_size=2" in result.stderr


def test_dry_run_json_is_the_plan():
    result = submit("--preset", "goyal_r50_bs8k", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert (plan["global_batch"], plan["steps_per_epoch"], plan["warmup_steps"]) == (8192, 156, 780)


def test_emit_sbatch_prepares_the_run_and_submits_nothing(shard_dir, weird_root):
    run_dir, script = weird_root / "emitted run", weird_root / "job one.sbatch"
    result = submit("--emit-sbatch", str(script), "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "config.json").is_file() and (run_dir / "ds_config.json").is_file()
    assert (run_dir / "slurm").is_dir()  # srun writes the rank logs there
    assert not (run_dir / "metrics.jsonl").exists()
    assert "pipeline.rank" in script.read_text()


def test_rank_entry_point_needs_a_prepared_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.rank", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "--emit-sbatch" in result.stderr
