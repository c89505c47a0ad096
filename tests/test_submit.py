"""The main job end to end: python -m pipeline.submit through submitit's local executor, 2 gloo ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import pick_port, run_here, run_module, SMALL, start_rank, start_ranks, truncate_sample, weight_names

from pipeline import config
from pipeline.shards import index
from pipeline.submit import main as submit_main
from pipeline.train import checkpoint, engine, metrics, model, schedule, tags


def submit(*args, cwd=None):
    return run_module("pipeline.submit", *args, cwd=cwd)


@pytest.fixture(scope="module")
def run(shard_dir, weird_root):
    run_dir = weird_root / "run one"
    # A periodic checkpoint after every step (0.36 ms): the other runs of SMALL, without them, end with the same
    # weights (test_a_run_stopped_on_two_ranks_resumes_on_one...)
    args = ["--cluster", "local", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL,
            "train.checkpoint_every_min=0.000006"]
    result = submit(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(run_dir, pristine(run_dir))  # for the tests that damage a copy: others change run_dir
    return run_dir, args, result


def pristine(run_dir: Path) -> Path:
    """The copy of the fixture's run folder made as it finished."""
    return run_dir.with_name(run_dir.name + " as it finished")


@pytest.mark.slow
def test_run_folder_holds_config_metrics_checkpoints_and_report(run):
    run_dir, _, result = run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["plan"]["global_batch"] == 16 and saved["plan"]["steps_per_epoch"] == 15
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0
    records = metrics.read(run_dir / "metrics.jsonl")
    iters = [r for r in records if r["_type"] == "train_iter"]
    evals = [r for r in records if r["_type"] == "eval"]
    assert [r["step"] for r in iters] == list(range(1, 31))
    assert {"step", "epoch", "lr", "loss", "img_s"} <= set(iters[0])
    assert [r["epoch"] for r in evals] == [0, 1]
    assert all(r["num_samples"] == 70 for r in evals)
    assert {"top1_err", "top5_err"} <= set(evals[0])
    # It learns: images and labels still belong together (chance: loss ln 10 = 2.30, error 90%). Thirty steps
    # of 16 images, so the exact numbers vary with the CPU's arithmetic; the margins do not.
    losses = [r["loss"] for r in iters]
    assert sum(losses[-5:]) / 5 < 2.0 < sum(losses[:5]) / 5 and evals[-1]["top1_err"] < 88
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-002"
    periodic = [r["step"] for r in records if r["_type"] == "checkpoint"]
    assert periodic == [*range(2, 15), *range(16, 30)]  # the step after each poll, but an epoch's last
    kept = sorted((d.name, int((d / "COMPLETE").read_text())) for d in (run_dir / "checkpoints").iterdir() if d.is_dir())
    assert kept == [("epoch-002", 30), ("step-0000028", 28), ("step-0000029", 29)]  # train.keep_checkpoints=3 by step
    assert len(list((run_dir / "checkpoints" / "epoch-002").glob("rank*_state.pt"))) == 2  # RNG and BN, per rank
    assert (run_dir / "curves.png").stat().st_size > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs"] == 2 and report["final_top1_err"] == evals[-1]["top1_err"]
    assert list((run_dir / "submitit").glob("*_1_log.err"))  # both ranks logged
    assert "epoch 2/2 done" in result.stdout and "top-1 error" in result.stdout


@pytest.mark.slow
def test_lr_follows_the_plan_through_the_engine(run):
    run_dir, _, _ = run
    cfg, plan = config.load_run_config(run_dir)
    iters = [r for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "train_iter"]
    assert plan.warmup_steps == 15 and iters[0]["lr"] == pytest.approx(0.0125)
    for r in iters:  # record `step` is the optimizer step just taken, with the lr it used
        assert r["lr"] == pytest.approx(schedule.lr_at(r["step"] - 1, cfg.optim.base_lr, plan, cfg.schedule)), r


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_repeats_the_run_exactly(run):
    run_dir, args, _ = run
    first = metrics.read(run_dir / "metrics.jsonl")
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").write_text("step-0000028")  # as if the run crashed after its periodic checkpoint at step 28 ...
    shutil.rmtree(ckpt / "epoch-002")
    shutil.rmtree(ckpt / "step-0000029")
    (ckpt / "step-0000029").mkdir()  # ... while writing the next one: half a file, `latest` not yet moved
    (ckpt / "step-0000029" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    (ckpt / "latest.partial").write_text("step-0000029")
    again = submit(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step-0000028 at epoch 1, step 28; steps 29-30 run again" in again.stdout
    assert not (ckpt / "step-0000029").exists()  # an unfinished save: removed at the next complete one
    second = metrics.read(run_dir / "metrics.jsonl")[len(first):]
    def after_28(records):
        return [(r["_type"], r.get("step"), r.get("lr"), r.get("loss"), r.get("top1_err"))
                for r in records if r["_type"] in ("train_iter", "eval") and r["step"] > 28]
    want, got = after_28(first), after_28(second)
    assert [w[:2] for w in want] == [("train_iter", 29), ("train_iter", 30), ("eval", 30)]
    for w, g in zip(want, got, strict=True):
        assert w[:3] == g[:3]
        assert g[3:] == pytest.approx(w[3:], rel=1e-5, abs=1e-6)  # model, momentum, lr and data all came back


@pytest.mark.slow
def test_a_changed_config_is_refused_for_an_existing_run(run, capsys):
    run_dir, args, _ = run
    changed = run_here(submit_main, capsys, *args, "optim.base_lr=0.2", "train.seed=3")
    assert changed.returncode == 2 and "holds another config" in changed.stderr
    assert "optim.base_lr: 0.0125 -> 0.2; train.seed: 0 -> 3" in changed.stderr
    saved = run_dir / "ds_config.json"
    original = saved.read_text()
    try:  # a run started before the JSON turned DeepSpeed's timers off resumes; another optimisation does not
        saved.write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "timers"}))
        assert run_here(submit_main, capsys, *args, "--dry-run").returncode == 0
        saved.write_text(json.dumps({**json.loads(original), "communication_data_type": "bf16"}))
        refused = run_here(submit_main, capsys, *args, "--dry-run")
        assert refused.returncode == 2 and "this run was started with in communication_data_type" in refused.stderr
    finally:
        saved.write_text(original)


@pytest.mark.parametrize("flags, message", [
    (["--slurm", "nodes=4"], "nodes is set by the launcher"),
    (["--slurm", "comment=two words"], "cannot go on an #SBATCH line"),
    (["--slurm", "reservation"], "is not KEY=VALUE"),
    (["--time", "1", "--signal-delay", "90"], "--signal-delay 90 s is not shorter than --time 1 min"),
    (["--sweep", "cluster.nodes=1,2"], "every run of a job array gets the same resources"),
    (["--sweep", "train.micro_batch"], "is not KEY=V1,V2"),
])
def test_bad_slurm_flags_are_refused_before_anything_runs(flags, message, capsys):
    result = run_here(submit_main, capsys, "--preset", "goyal_r50_bs8k", "--dry-run", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_multi_node_run_folders_must_be_on_a_shared_filesystem(shard_dir, tmp_path, capsys):
    run_dir = Path("/dev/shm") / f"pipeline-test-{os.getpid()}"
    result = run_here(submit_main, capsys, "--emit-sbatch", str(tmp_path / "job.sbatch"), "--nodes", "2",
                      "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL)
    assert result.returncode == 2 and "is on a tmpfs filesystem (mounted at /dev/shm)" in result.stderr
    assert "--assume-shared" in result.stderr and not run_dir.exists()


def test_sweep_dry_run_lists_every_run(tmp_path, capsys):
    result = run_here(submit_main, capsys, "--preset", "goyal_r50_bs256", "--dry-run", "--json",
                      "--run-dir", str(tmp_path / "sweep"), "--sweep", "train.micro_batch=16,32",
                      "--sweep", "optim.nesterov=false,true")
    assert result.returncode == 0, result.stderr
    plans = json.loads(result.stdout)
    assert [Path(p["run_dir"]).name for p in plans] == [
        "00_train.micro_batch=16_optim.nesterov=false", "01_train.micro_batch=16_optim.nesterov=true",
        "02_train.micro_batch=32_optim.nesterov=false", "03_train.micro_batch=32_optim.nesterov=true"]
    assert [p["plan"]["peak_lr"] for p in plans] == [0.05, 0.05, 0.1, 0.1]


def test_missing_shards_fail_before_anything_is_submitted(tmp_path, capsys):
    result = run_here(submit_main, capsys, "--cluster", "local", "--run-dir", str(tmp_path / "run"),
                      f"data.shards={tmp_path}", *SMALL)
    assert result.returncode == 2
    assert "python -m pipeline.shards convert" in result.stderr
    assert not (tmp_path / "run").exists()


def test_auto_refuses_when_srun_is_there_but_no_slurm_controller_answers(tmp_path, monkeypatch, capsys):
    """A login node with Slurm's clients but a controller that is down (here: a slurm.conf naming a port
    nobody listens on, or no scontrol at all): one error with Slurm's words and both ways out, before anything
    is written, instead of starting a cluster's ranks on the login node (or sbatch's traceback)."""
    from pipeline.launch.checks import choose_cluster

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    (tmp_path / "slurm.conf").write_text("ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    with pytest.raises(ValueError, match=r"(?s)srun is on PATH but no Slurm controller answers \(scontrol ping: .+\); "
                                         "nothing was written or submitted. Pass --cluster slurm once Slurm answers "
                                         "again .+, or --cluster local to run on this machine anyway"):
        choose_cluster("auto")
    assert choose_cluster("slurm") == "slurm"  # asked for by name: not second-guessed
    assert choose_cluster("local") == "local"
    run_dir = tmp_path / "run"
    refused = run_here(submit_main, capsys, "--preset", "goyal_r50_bs8k", "--nodes", "32", "--gpus-per-node", "8",
                       "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "--cluster local to run on this machine anyway" in refused.stderr
    assert not run_dir.exists()


def test_auto_refuses_a_local_run_of_more_ranks_than_this_machine_has_cores(tmp_path, monkeypatch, capsys):
    """Where Slurm is not installed, --cluster auto runs here: not with more ranks than cores (or GPUs)."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no srun (the Slurm tests may have installed it)
    run_dir = tmp_path / "run"
    refused = run_here(submit_main, capsys, "--gpus-per-node", str((os.cpu_count() or 1) + 1), "--run-dir", str(run_dir))
    assert refused.returncode == 2
    assert f"this run has {(os.cpu_count() or 1) + 1} ranks but this machine has {os.cpu_count()} CPU cores" in refused.stderr
    assert "Pass --cluster local to do that anyway" in refused.stderr and not run_dir.exists()


def test_debug_cluster_refuses_several_ranks(shard_dir, tmp_path):
    result = submit("--cluster", "debug", "--run-dir", str(tmp_path / "run"), f"data.shards={shard_dir}", *SMALL)
    assert result.returncode == 2 and "world_size=2" in result.stderr


def test_dry_run_json_is_the_plan(capsys):
    result = run_here(submit_main, capsys, "--preset", "goyal_r50_bs8k", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert (plan["global_batch"], plan["steps_per_epoch"], plan["warmup_steps"]) == (8192, 156, 780)


def test_dry_run_predicts_step_time_and_scaling_on_the_papers_cluster(capsys):
    result = run_here(submit_main, capsys, "--preset", "goyal_r50_bs8k", "--dry-run")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("predicted on p100-50gbe"))
    assert "step 233.8 ms" in line and "35,036 images/s" in line and "90 epochs in 0.91 h" in line
    assert "scaling efficiency 96.7% of one node" in line
    demo = run_here(submit_main, capsys, "--dry-run")
    assert "no prediction: hardware p100-50gbe has compute times for resnet50, not resnet10" in demo.stdout
    wrong = run_here(submit_main, capsys, "--dry-run", "--hardware", "p4")
    assert wrong.returncode == 2 and "--hardware p4: neither a preset (p100-50gbe) nor a file" in wrong.stderr
    assert "world_size" not in wrong.stdout  # refused before the plan is printed


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


def with_a_corrupt_train_image(shard_dir, out):
    """A copy of the shards whose first train shard holds a truncated JPEG (in a sound tar, indexed again)."""
    shutil.copytree(shard_dir, out)
    key = truncate_sample(out / "train-000000.tar", index=3, keep=100)
    index.index(out)
    return out, key


@pytest.mark.slow
def test_debug_cluster_trains_one_rank_in_process(shard_dir, tmp_path):
    run_dir = tmp_path / "debug run"
    shards, bad_key = with_a_corrupt_train_image(shard_dir, tmp_path / "shards")
    result = submit("--cluster", "debug", "--gpus-per-node", "1", "--run-dir", str(run_dir), f"data.shards={shards}",
                    *SMALL, "schedule.epochs=1", "train.grad_accum=2", "train.precise_bn_batches=4")
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics.read(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["_type"] == "eval"]
    assert len(evals) == 1 and evals[0]["num_samples"] == 70
    # the corrupt image is named, replaced, counted, and the epoch still has all its steps
    assert evals[0]["train_corrupt"] == 1 and "1 corrupt training images replaced" in result.stdout
    assert f"{bad_key!r} is not a decodable image" in result.stderr
    # 240 images / 8 per micro-batch / 2 accumulated = 15 optimizer steps, each logged once
    assert [r["step"] for r in records if r["_type"] == "train_iter"] == list(range(1, 16))


@pytest.mark.slow
def test_a_run_stopped_with_ctrl_c_on_two_ranks_resumes_on_one_and_ends_with_the_same_weights(run, shard_dir, tmp_path):
    """Ctrl-C in the terminal of a local 2-rank run: the launcher alone hears it (its job ignores SIGINT),
    asks the ranks to stop, says where they stopped, once, without a traceback. Resumed by the launcher on 1
    rank: it derives grad_accum 2 (the same global batch), every step is logged once, and the run ends where
    the uninterrupted 2-rank run ended."""
    reference, args, _ = run
    run_dir = tmp_path / "resized"
    same = ["--cluster", "local", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL]
    # A terminal's foreground process: SIGINT at its default (a test runner started in the background, as
    # `cmd &` in a script, hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt)
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline.submit", *same], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not any(r["_type"] == "train_iter" and r["step"] >= 5 for r in metrics.read(run_dir / "metrics.jsonl")):
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
    out, err = launcher.communicate(timeout=120)
    stop = [r for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "stop"]
    assert launcher.returncode == 130 and "Traceback" not in out + err, out + err
    assert len(stop) == 1 and 5 <= stop[0]["step"] < 15  # mid-epoch: 15 steps an epoch
    assert f"stopped after step {stop[0]['step']} (SIGTERM): checkpoint step-{stop[0]['step']:07d} complete" in out
    assert "Ctrl-C: every rank stops after its current step" in err and "to resume" in err
    refused = submit(*same, "--gpus-per-node", "3")
    assert refused.returncode == 2 and "global batch 16 cannot be kept on 3 ranks" in refused.stderr
    assert "among 1, 2 ranks" in refused.stderr
    prepared = submit(*same, "--gpus-per-node", "1", "--emit-sbatch", str(tmp_path / "one.sbatch"))
    assert "resuming on 1 ranks with train.grad_accum=2 (it ran on 2 with 1)" in prepared.stdout
    starts_from_the_mean_of_the_ranks(run_dir, stop[0]["checkpoint"], tmp_path / "state.pt")
    other_batch = submit(*same, "--gpus-per-node", "1", "train.grad_accum=4", "--dry-run")
    assert other_batch.returncode == 2 and "global batch is 16, and this command's would be 32" in other_batch.stderr
    resumed = submit(*same, "--gpus-per-node", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 0, step {stop[0]['step']}, on 1 ranks (it ran on 2)" in resumed.stdout
    steps = [r["step"] for r in metrics.read(run_dir / "metrics.jsonl") if r["_type"] == "train_iter"]
    assert steps == list(range(1, 31))  # every step once
    got, want = (torch.load(d / "checkpoints" / "epoch-002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
                 for d in (run_dir, reference))
    params = weight_names(got)
    assert len(params) > 20
    for name in params:
        # Bit for bit: with two micro-batches, one rank's (g1/2 + g2/2) and two ranks' (g1 + g2)/2 round the
        # same (halving is exact in binary floating point, and a sum of two is the same in either order).
        # With more ranks the summation order could differ in the last bit; here it cannot.
        assert torch.equal(got[name], want[name]), name


def resume_one_rank(rank: int, port: int, run_dir, tag: str, out) -> None:
    """One rank loading a checkpoint its 2 ranks wrote: what every rank of a smaller run starts from."""
    cfg, plan = config.load_run_config(run_dir)
    start_rank(0, 1, port, cfg)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan,
                                    json.loads((run_dir / "ds_config.json").read_text()))
    (run_dir / "checkpoints" / "latest").write_text(tag)
    assert checkpoint.resume(ds_engine, run_dir, config.to_dict(cfg))[2] == 2
    torch.save({"buffers": dict(ds_engine.module.named_buffers()), "rng": torch.get_rng_state()}, out)


def starts_from_the_mean_of_the_ranks(run_dir, tag: str, out) -> None:
    """After a resize, every rank takes the mean of the old ranks' BN running statistics and the RNG state of
    old rank (rank mod old ranks); the weights come from DeepSpeed's one file."""
    old = [torch.load(run_dir / "checkpoints" / tag / f"rank{r:05d}_state.pt", weights_only=False) for r in (0, 1)]
    start_ranks(resume_one_rank, pick_port(), run_dir, tag, out, ranks=1)
    state = torch.load(out, weights_only=False)
    means = [name for name in state["buffers"] if name.endswith("running_mean")]
    assert means and not torch.equal(old[0]["buffers"][means[0]], old[1]["buffers"][means[0]])
    for name, value in state["buffers"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (old[0]["buffers"][name] + old[1]["buffers"][name]) / 2)
    assert torch.equal(state["rng"], old[0]["rng"]["torch"])


def test_streaming_access_refuses_to_resume_on_another_shape(shard_dir, tmp_path, capsys):
    """With data.access=stream the batches depend on the number of ranks: a resize is refused; a longer
    collective timeout is no new shape, and no other optimisation."""
    same = ["--cluster", "local", "--run-dir", str(tmp_path / "streamed"), f"data.shards={shard_dir}", *SMALL,
            "data.access=stream"]
    assert run_here(submit_main, capsys, *same, "--emit-sbatch", str(tmp_path / "job.sbatch")).returncode == 0
    metrics.MetricsLog(tmp_path / "streamed" / "metrics.jsonl", enabled=True).write("train_iter", step=1)  # it ran
    refused = run_here(submit_main, capsys, *same, "--gpus-per-node", "1", "--dry-run")
    assert refused.returncode == 2 and "with data.access=stream the batches depend on the cluster's shape" in refused.stderr
    assert "cluster.gpus_per_node: 2 -> 1" in refused.stderr
    longer = run_here(submit_main, capsys, *same, "cluster.collective_timeout_s=3600", "--dry-run")
    assert longer.returncode == 0, longer.stderr


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_fails(shard_dir, tmp_path):
    run_dir = tmp_path / "diverged"
    result = submit("--cluster", "debug", "--gpus-per-node", "1", "--run-dir", str(run_dir), f"data.shards={shard_dir}",
                    *SMALL, "optim.base_lr=1e6")
    assert result.returncode == 1
    records = metrics.read(run_dir / "metrics.jsonl")
    (diverged,) = [r for r in records if r["_type"] == "diverged"]
    steps = [r["step"] for r in records if r["_type"] == "train_iter"]
    assert diverged["step"] < 15 and max(steps) <= diverged["step"] + 1  # stopped within a step of it, mid-epoch
    assert f"the loss was not finite (nan or inf) by step {diverged['step']}, at lr " in result.stderr
    assert "it has no checkpoint" in result.stderr and "Lower optim.base_lr" in result.stderr
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoints" / "latest").exists()
    assert "diverged: the loss was not finite" in result.stdout


def test_a_run_folder_that_never_trained_takes_the_corrected_command(shard_dir, tmp_path, capsys):
    run_dir = tmp_path / "first try"
    same = ["--cluster", "local", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL]
    assert run_here(submit_main, capsys, *same, "--emit-sbatch", str(tmp_path / "a.sbatch"),
                    "optim.base_lr=0.5").returncode == 0
    # the job never ran: nothing to lose
    again = run_here(submit_main, capsys, *same, "--emit-sbatch", str(tmp_path / "b.sbatch"))
    assert again.returncode == 0, again.stderr
    assert config.load_run_config(run_dir)[0].optim.base_lr == 0.0125


def test_overrides_may_follow_options_and_dry_run_says_whether_the_shards_are_ready(shard_dir, capsys):
    result = run_here(submit_main, capsys, "--preset", "goyal_r50_bs256", "--dry-run", "--gpus-per-node", "4",
                      "train.grad_accum=2", "--nodes", "1")
    assert result.returncode == 0, result.stderr
    assert "global_batch=256 (32/gpu x 4 x accum 2)" in result.stdout
    assert "shards: NOT READY: no manifest" in result.stdout and "python -m pipeline.shards convert" in result.stdout
    ready = run_here(submit_main, capsys, "--dry-run", f"data.shards={shard_dir}", *SMALL)
    assert "shards: ready" in ready.stdout


def damaged_copy(run, tmp_path) -> tuple:
    """A copy of the finished fixture run as if killed after its periodic checkpoint at step 29 (its end, report
    and epoch-002 gone), and the weights the uninterrupted run ended with."""
    run_dir, args, _ = run
    original = pristine(run_dir)
    want = torch.load(original / "checkpoints" / "epoch-002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    copy = tmp_path / "damaged run"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("submitit", "events.out.*"))
    shutil.rmtree(copy / "checkpoints" / "epoch-002")
    (copy / "report.json").unlink()
    records = [r for r in metrics.read(copy / "metrics.jsonl") if r.get("step", 0) <= 29 and r["_type"] != "eval"
               or r["_type"] == "eval" and r["step"] < 30]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return copy, [*args[:args.index("--run-dir")], "--run-dir", str(copy), *args[args.index("--run-dir") + 2:]], want


@pytest.mark.slow
def test_a_cut_short_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(run, tmp_path):
    """The newest tag's model file cut short (what a crash leaves when the data never reached the disk) and
    `latest` naming a tag that is gone: the resume checks the tags against their manifests, moves the damaged
    one aside (kept, not counted), resumes from the older one, says so, and ends with the uninterrupted run's
    weights. The command is --run-dir alone: the run resumes with the config and shape saved in its folder."""
    copy, args, want = damaged_copy(run, tmp_path)
    ckpt = copy / "checkpoints"
    model_file = ckpt / "step-0000029" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    (ckpt / "latest").write_text("epoch-009")  # dangling: a hint, not the truth
    result = submit("--cluster", "local", "--run-dir", str(copy))  # alone: the config and shape saved in the folder
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("skipped checkpoint step-0000029 (step 29): mp_rank_00_model_states.pt has 1,000 bytes" in result.stdout
            and "kept aside as step-0000029.damaged, 1 step to train again; resumed from step-0000028" in result.stdout)
    assert (ckpt / "step-0000029.damaged" / "mp_rank_00_model_states.pt").stat().st_size == 1000
    assert {d.name for d in ckpt.iterdir() if d.is_dir()} >= {"step-0000028", "step-0000029.damaged", "epoch-002"}
    assert "step-0000029.damaged" not in [tag for tag, _ in tags.complete_tags(ckpt)]
    got = torch.load(ckpt / "epoch-002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name in weight_names(got):
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_when_no_checkpoint_loads_the_launcher_says_what_is_wrong_with_each_without_a_traceback(run, tmp_path):
    copy, args, _ = damaged_copy(run, tmp_path)
    ckpt = copy / "checkpoints"
    for tag in ("step-0000028", "step-0000029"):
        (ckpt / tag / "rank00001_state.pt").write_bytes(b"not a checkpoint")
    result = submit(*args)
    assert result.returncode == 1
    err = result.stderr
    assert "Traceback" not in err and "NoCheckpointLoads: no checkpoint of" in err
    assert "step-0000029 (step 29): rank00001_state.pt has 16 bytes" in err
    assert "Restore a good copy of one of them" in err and "nothing was deleted" in err
    assert {d.name for d in ckpt.iterdir() if d.is_dir()} >= {"step-0000028.damaged", "step-0000029.damaged"}


@pytest.mark.slow
def test_run_dir_alone_takes_the_saved_config_and_what_else_is_given_are_changes(run, capsys):
    """No --preset, no overrides: the run folder's own config and shape (the fixture ran the demo preset with
    SMALL's overrides, which the demo preset alone would refuse); a new shape with the same global batch is
    allowed, an optimisation change refused naming the key."""
    run_dir, _, _ = run
    saved = json.loads((run_dir / "config.json").read_text())
    alone = run_here(submit_main, capsys, "--run-dir", str(run_dir), "--cluster", "local", "--dry-run", "--json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["config"] == saved["config"]
    reshaped = run_here(submit_main, capsys, "--run-dir", str(run_dir), "--gpus-per-node", "1", "--dry-run", "--json")
    assert reshaped.returncode == 0 and json.loads(reshaped.stdout)["config"]["train"]["grad_accum"] == 2
    changed = run_here(submit_main, capsys, "--run-dir", str(run_dir), "--dry-run", "optim.base_lr=0.5")
    assert changed.returncode == 2 and "optim.base_lr: 0.0125 -> 0.5" in changed.stderr


@pytest.mark.slow
def test_status_of_a_stopped_run_gives_the_command_that_resumes_it(run, tmp_path, capsys):
    copy, _, _ = damaged_copy(run, tmp_path)
    shown = run_here(submit_main, capsys, "--status", str(copy))
    assert shown.returncode == 0 and "not running (unknown to Slurm)" in shown.stdout
    assert f"resume it with: python -m pipeline.submit --run-dir '{copy}'" in shown.stdout
    finished = run_here(submit_main, capsys, "--status", str(pristine(run[0])))
    assert "resume it with" not in finished.stdout


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc (children of children ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def local_rank(processes: set[int], rank: int) -> int:
    """The pid of a local job's rank among processes: the one that runs submitit's task (not its wrapper,
    pipeline.launch.local_task)."""
    (pid,) = [p for p in processes
              if f"SUBMITIT_LOCAL_GLOBALID={rank}" in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace")
              and Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-u", b"-m", b"submitit.core._submit"]]
    return pid


@pytest.mark.slow
def test_a_local_rank_killed_with_sigkill_leaves_no_process_behind_and_the_launcher_says_how_to_resume(
        shard_dir, tmp_path):
    """Rank 1 of a 2-rank local run SIGKILLed mid-run: its forkserver and loader worker die with it (they block
    the stop signals, and were left behind as orphans), every process of the job ends, and the launcher's last
    word names the rank that died, what rank 0 saw, and the command that resumes the run."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline.submit", "--cluster", "local", "--run-dir", str(run_dir),
                                 f"data.shards={shard_dir}", *SMALL, "schedule.epochs=30", "train.checkpoint_every_min=0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not any(r["_type"] == "train_iter" and r["step"] >= 20 for r in metrics.read(run_dir / "metrics.jsonl")):
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            time.sleep(0.2)
        job = descendants(launcher.pid)
        rank = local_rank(job, 1)
        assert len(job) >= 10  # controller, 2 ranks and their wrappers, trackers, forkservers, workers
        os.kill(rank, signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    time.sleep(2)
    alive = [p for p in job if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]  # zombies are gone
    assert not alive, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in alive]
    assert launcher.returncode == 1 and "Traceback" not in err
    assert "error: the job failed: rank 1 was killed by SIGKILL (by hand, or by the kernel's out-of-memory killer" in err
    assert "then RuntimeError: rank 0: a collective failed" in err
    assert f"resume it with: python -m pipeline.submit --run-dir {run_dir}" in err


@pytest.mark.slow
def test_max_requeues_restarts_a_local_job_whose_rank_was_killed_from_its_newest_checkpoint(shard_dir, tmp_path):
    """--max-requeues 1 on this machine: rank 0 SIGKILLed in epoch 2, after epoch 1's checkpoint (it leaves no
    result at all, which submitit reports otherwise than a rank's exception); the launcher writes the `failed`
    record (restarted), starts the job again, which resumes from that checkpoint and finishes: exit 0, a
    report, every step trained."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline.submit", "--cluster", "local", "--run-dir", str(run_dir),
                                 "--max-requeues", "1", f"data.shards={shard_dir}", *SMALL, "schedule.epochs=3",
                                 "train.checkpoint_every_min=0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not any(r["_type"] == "train_iter" and r["step"] >= 18 for r in metrics.read(run_dir / "metrics.jsonl")):
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            time.sleep(0.2)
        os.kill(local_rank(descendants(launcher.pid), 0), signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, err[-3000:]
    records = metrics.read(run_dir / "metrics.jsonl")
    kinds = [r["_type"] for r in records]
    failed = records[kinds.index("failed")]
    assert failed["requeued"] and failed["tasks"][0].startswith("rank 0 was killed by SIGKILL"), failed
    assert "restarted from the newest checkpoint (1 of at most 1 restarts)" in err
    resume = records[kinds.index("resume")]
    assert kinds.index("failed") < kinds.index("resume") and resume["step"] == 15 and resume["epoch"] == 1, resume
    assert (run_dir / "report.json").is_file() and records[-1]["_type"] == "eval" and records[-1]["epoch"] == 2
    assert max(r["step"] for r in records if r["_type"] == "train_iter") == 45
