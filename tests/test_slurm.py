"""The launcher, both sbatch templates and preemption on a real Slurm: one controller and two emulated
nodes on this host (tests/slurm/start.sh). Marked `slurm`: they skip, with the reason, where Slurm cannot
be started (not root, or its packages missing without apt-get); as root, a Slurm that fails to start
fails them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SMALL, run_module, weight_names

from pipeline.train import metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# Long enough (~45 s on 2 cores) that the first warning of a 1-minute time limit (SIGUSR2 55 s before it,
# which Slurm, checking every 30 s, sends 5 to 35 s after the start) always lands before the end.
LONG = [*SMALL, "schedule.epochs=20"]
TOTAL_STEPS = 20 * 15


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running Slurm for the session; SLURM_CONF points every client (and submitit) at it."""
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(ROOT / "tests/slurm/start.sh"), str(folder)], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"tests/slurm/start.sh could not start Slurm:\n{started.stdout}{started.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run(["bash", str(ROOT / "tests/slurm/stop.sh"), str(folder)])
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


def submit(*args, timeout=300):
    return run_module("pipeline.submit", *args, timeout=timeout, cwd=ROOT)


def in_queue(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip())


def wait_until(condition, timeout: float, what: str, logs: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(logs.rglob("*.log*"))
                              + sorted(logs.rglob("*.out")) + sorted(logs.rglob("*.err")))
            pytest.fail(f"{what} did not happen within {timeout} s; logs:\n{tails}")
        time.sleep(0.2)


def submitted_job(run_dir: Path) -> str:
    return json.loads((run_dir / "submitted.json").read_text())["job_id"]


def steps(run_dir: Path, kind: str = "train_iter") -> list:
    return [r for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == kind]


def final_state(run_dir: Path) -> dict:
    """The trained module (weights and BN statistics) of the run's last checkpoint."""
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    assert worst <= 1e-6, f"final parameters differ from the uninterrupted run by up to {worst}"


def assert_every_step_once(run_dir: Path, total: int) -> None:
    assert [r["step"] for r in steps(run_dir)] == list(range(1, total + 1))


@pytest.fixture(scope="module")
def reference(slurm, shard_dir, tmp_path_factory):
    """The uninterrupted 2-rank run that interrupted ones must reproduce, submitted through submitit."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    result = submit("--cluster", "slurm", "--time", "10", "--run-dir", str(run_dir), "--wait",
                    f"data.shards={shard_dir}", *LONG)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def test_submit_on_slurm_runs_every_rank_and_status_shows_the_job(reference):
    assert_every_step_once(reference, TOTAL_STEPS)
    assert (reference / "report.json").is_file()
    kept = sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["epoch-018", "epoch-019", "epoch-020"]  # train.keep_checkpoints=3
    assert sorted(p.name for p in (reference / "submitit").glob("*_log.out")) == [
        f"{submitted_job(reference)}_{rank}_log.out" for rank in (0, 1)]
    start = steps(reference, "start")[0]
    assert start["job_id"] == submitted_job(reference) and start["restarts"] == 0
    shown = submit("--status", str(reference))
    assert shown.returncode == 0, shown.stderr
    assert f"job {submitted_job(reference)} COMPLETED" in shown.stdout and "epoch 20/20 done" in shown.stdout


def test_auto_picks_slurm_where_it_answers_and_a_refusal_is_one_sentence_with_the_way_out(slurm, shard_dir,
                                                                                         tmp_path):
    from pipeline.launch.checks import choose_cluster

    assert choose_cluster("auto") == "slurm"
    refused = submit("--cluster", "slurm", "--partition", "nosuch", "--run-dir", str(tmp_path / "refused"),
                     f"data.shards={shard_dir}", *SMALL)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "error: Slurm refused the job: " in refused.stderr and "invalid partition" in refused.stderr.lower()
    assert "run on this machine with --cluster local" in refused.stderr


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the run's rank processes (submitit's, under srun), found in /proc."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in argv and str(run_dir / "submitit").encode() in argv:
            ranks = [int(e.partition(b"=")[2]) for e in env if e.startswith(b"SLURM_PROCID=")]
            found[ranks[0]] = int(proc.name)
    return found


def test_a_run_stopped_by_usr2_then_killed_without_warning_ends_like_the_uninterrupted_run(reference, shard_dir,
                                                                                         tmp_path):
    """USR2 mid-epoch: every rank checkpoints after the same step and the job requeues itself. Later, SIGKILL to
    rank 1 at a random step: srun ends the job step, pipeline.requeue requeues the job, which resumes from the
    newest complete checkpoint (a periodic one every 3 s, or an epoch's). The run ends with the losses and the
    weights of the uninterrupted run, bit for bit."""
    run_dir = tmp_path / "interrupted"
    result = submit("--cluster", "slurm", "--time", "10", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *LONG,
                    "train.checkpoint_every_min=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    job = submitted_job(run_dir)
    wait_until(lambda: len(steps(run_dir)) >= 20, 120, "step 20", run_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # every process of the job step gets it
    wait_until(lambda: steps(run_dir, "resume"), 180, "the resume after USR2", run_dir)
    (stop,) = steps(run_dir, "stop")
    assert stop["signal"] == "SIGUSR2" and stop["requeued"] and stop["checkpoint"] == f"step-{stop['step']:07d}"
    assert stop["step"] % 15 != 0, "the stop was meant to land mid-epoch"
    (resume,) = steps(run_dir, "resume")
    assert resume["step"] == stop["step"] and resume["checkpoint"] == stop["checkpoint"]
    assert resume["superseded_steps"] is None  # a stop's checkpoint is its last step: nothing runs twice

    at = random.randint(stop["step"] + 20, 250)
    wait_until(lambda: max(r["step"] for r in steps(run_dir)) >= at, 180, f"step {at}", run_dir)
    os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
    wait_until(lambda: len(steps(run_dir, "resume")) == 2, 240, f"the resume after the kill at step {at}", run_dir)
    wait_until(lambda: not in_queue(job), 240, "the end of the twice requeued job", run_dir)
    (failed,) = steps(run_dir, "failed")
    assert failed["requeued"] and failed["exit_code"] != 0, failed
    assert any(task.startswith("task 1: Killed") for task in failed["tasks"]), failed
    assert [r["restarts"] for r in steps(run_dir, "start")] == [0, 1, 2]
    assert sorted({r["epoch"] for r in steps(run_dir, "eval")}) == list(range(20))
    last = {r["step"]: r["loss"] for r in steps(run_dir)}  # a step trained again supersedes its first record
    assert last == {r["step"]: r["loss"] for r in steps(reference)}, f"killed at step {at}"
    got, want = final_state(run_dir), final_state(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"killed at step {at}"


def test_sbatch_template_on_two_nodes_survives_a_short_time_limit(reference, shard_dir, tmp_path):
    """slurm/train.sbatch, 2 emulated nodes x 1 task: USR2 55 s before a 1-minute limit, scontrol requeue
    (as often as it takes), and the same final model as the uninterrupted 2-rank run."""
    run_dir, script = tmp_path / "time limited", tmp_path / "train job.sbatch"
    result = submit("--emit-sbatch", str(script), "--nodes", "2", "--gpus-per-node", "1", "--time", "1",
                    "--signal-delay", "55", "--max-requeues", "10", "--assume-shared", "--run-dir", str(run_dir),
                    f"data.shards={shard_dir}", *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    job = subprocess.run(["sbatch", "--parsable", "--output", str(tmp_path / "batch-%j.out"), str(script)],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    wait_until(lambda: (run_dir / "report.json").is_file() and not in_queue(job), 420, "the end of the job", tmp_path)
    stops = steps(run_dir, "stop")
    assert stops and all(s["requeued"] and s["signal"] in ("SIGUSR2", "SIGTERM") for s in stops)
    assert [r["restarts"] for r in steps(run_dir, "start")] == list(range(len(stops) + 1))
    assert {r["job_id"] for r in steps(run_dir, "start")} == {job}
    assert_every_step_once(run_dir, TOTAL_STEPS)
    assert_same_state(final_state(run_dir), final_state(reference))
    logs = sorted(p.name for p in (run_dir / "slurm").glob("*.log"))
    assert logs == [f"{job}_0.log", f"{job}_1.log"]  # one log per rank, appended to across requeues


def test_a_run_stopped_on_two_nodes_resumes_on_one_with_the_same_weights(reference, shard_dir, tmp_path):
    """2 nodes x 1 rank under slurm/train.sbatch, stopped mid-epoch and not requeued (--max-requeues 0);
    then the same run folder through submitit on 1 node x 1 rank: grad_accum 2, the same global batches,
    and the final weights of the uninterrupted 2-rank run."""
    run_dir, script = tmp_path / "resized", tmp_path / "two nodes.sbatch"
    result = submit("--emit-sbatch", str(script), "--nodes", "2", "--gpus-per-node", "1", "--time", "10",
                    "--max-requeues", "0", "--assume-shared", "--run-dir", str(run_dir), f"data.shards={shard_dir}",
                    *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    job = subprocess.run(["sbatch", "--parsable", "--output", str(tmp_path / "batch-%j.out"), str(script)],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    wait_until(lambda: len(steps(run_dir)) >= 20, 120, "step 20", tmp_path)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: not in_queue(job), 180, "the end of the stopped job", tmp_path)
    (stop,) = steps(run_dir, "stop")
    assert not stop["requeued"] and stop["step"] % 15 != 0
    (failed,) = steps(run_dir, "failed")  # the script's pipeline.requeue ran after srun, and kept to the limit
    assert not failed["requeued"] and failed["reason"].endswith("(--max-requeues 0)"), failed
    resumed = submit("--cluster", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "10", "--wait",
                     "--run-dir", str(run_dir), f"data.shards={shard_dir}", *LONG)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming on 1 ranks with train.grad_accum=2 (it ran on 2 with 1)" in resumed.stdout
    (resume,) = steps(run_dir, "resume")
    assert (resume["step"], resume["ranks"], resume["ranks_before"]) == (stop["step"], 1, 2)
    assert_every_step_once(run_dir, TOTAL_STEPS)
    got, want = final_state(run_dir), final_state(reference)
    weights = weight_names(want)
    assert len(weights) > 20
    # as exact as the 2-rank runs among themselves: a sum of two gradients rounds the same in either order
    assert_same_state({k: got[k] for k in weights}, {k: want[k] for k in weights})


def test_sbatch_template_on_two_nodes_by_two_tasks(slurm, shard_dir, weird_root):
    run_dir, script = weird_root / "four ranks", weird_root / "four ranks.sbatch"
    result = submit("--emit-sbatch", str(script), "--nodes", "2", "--gpus-per-node", "2", "--time", "10",
                    "--assume-shared", "--slurm", "comment=pipeline-test", "--run-dir", str(run_dir),
                    f"data.shards={shard_dir}", *SMALL, "schedule.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    done = subprocess.run(["sbatch", "--wait", "--parsable", "--output", str(weird_root / "batch-%j.out"), str(script)],
                          capture_output=True, text=True, timeout=300, cwd=weird_root)
    assert done.returncode == 0, done.stderr + "".join(p.read_text()[-2000:] for p in (run_dir / "slurm").glob("*"))
    job = done.stdout.strip()
    (start,) = steps(run_dir, "start")
    assert start["world_size"] == 4 and start["job_id"] == job
    assert [r["step"] for r in steps(run_dir)] == list(range(1, 8))  # 240 // (4 x 8) = 7 steps
    nodes = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "NodeList=n[1-2]" in nodes and "Comment=pipeline-test" in nodes


def test_sweep_is_one_job_array_with_a_run_folder_each(slurm, shard_dir, tmp_path):
    run_dir = tmp_path / "sweep"
    result = submit("--cluster", "slurm", "--gpus-per-node", "1", "--time", "10", "--run-dir", str(run_dir),
                    "--sweep", "train.micro_batch=8,16", "--wait", f"data.shards={shard_dir}", *SMALL,
                    "schedule.epochs=1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = json.loads((run_dir / "sweep.json").read_text())["runs"]
    assert [r["folder"] for r in runs] == ["00_train.micro_batch=8", "01_train.micro_batch=16"]
    (array,) = {r["job_id"].split("_")[0] for r in runs}
    assert [r["job_id"] for r in runs] == [f"{array}_{i}" for i in (0, 1)]
    for run, batch, steps_per_epoch in zip(runs, (8, 16), (30, 15)):
        saved = json.loads((run_dir / run["folder"] / "config.json").read_text())
        assert saved["plan"]["global_batch"] == batch and saved["plan"]["steps_per_epoch"] == steps_per_epoch
        assert (run_dir / run["folder"] / "report.json").is_file()
    shown = submit("--status", str(run_dir))
    assert shown.returncode == 0 and shown.stdout.count("epoch 1/1 done") == 2, shown.stdout + shown.stderr


def test_the_quick_study_on_slurm_is_one_job_array_and_writes_its_table(slurm, shard_dir, tmp_path):
    out = tmp_path / "study"
    args = ["--quick", "--cluster", "slurm", "--time", "10", "--out", str(out), f"data.shards={shard_dir}",
            *[o for o in SMALL if not o.startswith("train.log_every")]]
    result = run_module("pipeline.reproduce", *args, "--wait", timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = json.loads((out / "epochs1" / "runs" / "sweep.json").read_text())["runs"]
    assert [r["folder"] for r in runs] == ["kn1x-seed0", "kn4x-seed0", "kn4x-no-warmup-seed0"]
    assert len({r["job_id"].split("_")[0] for r in runs}) == 1  # one job array
    table = json.loads((out / "epochs1" / "table1.json").read_text())
    assert all(run["state"] == "finished" for row in table["rows"] for run in row["runs"])
    again = run_module("pipeline.reproduce", *args, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "3 of 3 runs already ended (kept), 0 to train" in again.stdout, again.stderr


def test_shards_array_script_on_slurm(slurm, image_tree, shard_dir, weird_root):
    """slurm/shards.sbatch as a 3-task array, then the merge: the same manifest as a one-process run."""
    out = weird_root / "array shards"
    done = subprocess.run(["sbatch", "--wait", "--array=0-2", "--cpus-per-task=1", "--output", str(weird_root / "shards-%A_%a.out"),
                           str(ROOT / "slurm/shards.sbatch"), str(image_tree), str(out), "--shard-samples", "25"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in weird_root.glob("shards-*.out"))
    merged = subprocess.run([sys.executable, "-m", "pipeline.shards", "convert", "--src", str(image_tree),
                             "--out", str(out), "--shard-samples", "25"], capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr
    assert "(0 shards written now)" in merged.stderr
    for split in ("train", "val"):
        assert json.loads((out / f"{split}.json").read_text()) == json.loads((shard_dir / f"{split}.json").read_text())


def test_tune_buckets_on_two_nodes_measures_the_link_between_them(slurm, tmp_path):
    """The tuner is a job like training: on 2 Slurm nodes it fits the link between nodes, which the dry run
    of a bigger job then uses."""
    run_dir = tmp_path / "tune"
    result = run_module("pipeline.tune_buckets", "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "1",
                        "--time", "10", "--assume-shared", "--run-dir", str(run_dir), "--sizes", "1000000",
                        "--steps", "1", "--rounds", "1", "--wait", cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "allreduce inter-node" in result.stdout and "<- best" in result.stdout
    hardware = json.loads((run_dir / "hardware.json").read_text())
    assert hardware["intra"] is None and hardware["inter"]["bandwidth_Bps"] > 0
    dry = submit("--dry-run", "--nodes", "4", "--gpus-per-node", "1", "--hardware", str(run_dir / "hardware.json"))
    assert dry.returncode == 0 and "predicted on measured-tune" in dry.stdout, dry.stdout + dry.stderr
