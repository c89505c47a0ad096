"""Stop signals without Slurm: ranks agree on one stop step, and loader workers outlive the signals."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from helpers import pick_port, start_rank, start_ranks
from pipeline.train import preempt

WORLD = 3
SIGNALLED_RANK, SIGNALLED_AT = 2, 5


def agree_main(rank, port, out_dir):
    start_rank(rank, WORLD, port)
    stop = preempt.StopRequest().install()
    polls = []
    for step in range(1, 20):
        if rank == SIGNALLED_RANK and step == SIGNALLED_AT:
            os.kill(os.getpid(), signal.SIGUSR2)  # only this rank hears it, as only rank 0 hears submitit
        polls.append(stop.poll(torch.device("cpu")))
        if polls[-1]:
            break
    torch.save({"stopped_at": step, "received": stop.received, "settled": stop.settle(torch.device("cpu"))},
               out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step_when_one_rank_is_signalled(tmp_path, free_port):
    start_ranks(agree_main, free_port, tmp_path, ranks=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # the signal arrives before poll 5; poll 5 starts the allreduce carrying it and poll 6 reads it
    assert [r["stopped_at"] for r in results] == [SIGNALLED_AT + 1] * WORLD
    assert [r["received"] for r in results] == [None, None, "SIGUSR2"]
    assert all(r["settled"] for r in results)


def test_no_signal_no_stop(free_port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        stop = preempt.StopRequest()
        assert not any(stop.poll(torch.device("cpu")) for _ in range(5)) and not stop.settle(torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_loader_workers_outlive_usr2_and_term_sent_to_the_whole_process_group(shard_dir, tmp_path):
    """Slurm signals every process of a job step, DataLoader workers included: they must keep loading
    until the rank reaches its step boundary."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from pipeline import config
        from pipeline.data import streams, workers
        from pipeline.train import preempt
        from pipeline.data.manifest import load_manifest

        if __name__ == "__main__":
            stop = preempt.StopRequest().install()
            cfg = config.apply_overrides(config.preset("demo"), ["data.shards=" + sys.argv[1], "data.workers=2",
                                                                 "data.train_samples=240", "train.micro_batch=8"])
            stream = streams.TrainStream(load_manifest(cfg.data.shards, "train"), cfg.data, 8, 30, 0, 1, 0)
            stream.set_epoch(0)
            batches = iter(workers.loader(stream, cfg.data, False))
            seen = [next(batches)]
            os.killpg(0, signal.SIGUSR2)
            os.killpg(0, signal.SIGTERM)
            seen += list(batches)
            print(len(seen), stop.received)
    """))
    result = subprocess.run([sys.executable, str(script), str(shard_dir)], capture_output=True, text=True, timeout=120,
                            start_new_session=True)  # its own process group: the signals stay in it
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["30", "SIGUSR2"]


def test_a_stop_outside_slurm_says_nothing_was_requeued(monkeypatch):
    """submitit's local executor installs its requeue handler too; outside Slurm there is nothing to requeue."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    stop = preempt.StopRequest()
    def submitit_handler(signum, frame):
        raise SystemExit(-1)
    stop.previous[signal.SIGUSR2] = submitit_handler
    assert stop.requeue(max_requeues=3) == (False, "not requeued (not a Slurm job)")


def test_checkpoints_are_kept_by_global_step_and_unfinished_saves_removed(tmp_path):
    """Folder times play no part: a tag resumed into and rewritten later must not outlive newer steps, and a
    save that never completed (no COMPLETE file) takes no slot."""
    from pipeline.train import tags

    ckpt = tmp_path / "checkpoints"
    for age, (tag, step) in enumerate([("epoch-002", 30), ("step-0000045", 45), ("step-0000020", 20),
                                       ("epoch-001", 15), ("step-0000040", 40)]):
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / tags.COMPLETE).write_text(f"{step}\n")
        os.utime(ckpt / tag, (1000 - age, 1000 - age))  # the newest step is not the newest folder
    (ckpt / "step-0000050").mkdir()  # a save killed before every rank had written its files
    (ckpt / "latest").write_text("step-0000045")
    tags.prune(ckpt, keep=3)
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["epoch-002", "step-0000040", "step-0000045"]
    tags.prune(ckpt, keep=0)  # keep all: only unfinished saves go
    assert len([d for d in ckpt.iterdir() if d.is_dir()]) == 3


def test_a_failed_job_step_is_requeued_only_where_it_helps(tmp_path, monkeypatch):
    """pipeline.requeue after a job step that failed: a finished, a diverged run, one whose checkpoint could not
    be written (a full disk) and an attempt without a step are not requeued; one that trained is (scontrol itself is exercised on the real Slurm), within
    --max-requeues."""
    from pipeline import requeue
    from pipeline.train import metrics

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write("start", job_id="41", restarts=0)
    log.write("train_iter", step=1)
    log.write("start", job_id="41", restarts=1)  # this attempt
    assert requeue.decide(tmp_path, 3) == (False, "this attempt failed before its first step: a requeue would "
                                                  "fail the same way")
    log.write("train_iter", step=2)
    assert requeue.decide(tmp_path, 1) == (False, "not requeued: job 41 was requeued 1 times already "
                                                  "(--max-requeues 1)")
    (tmp_path / "saved.jsonl").write_bytes((tmp_path / "metrics.jsonl").read_bytes())
    log.write("diverged", step=2)
    assert requeue.decide(tmp_path, 3)[1].startswith("the run diverged")
    full = tmp_path / "full disk"
    full.mkdir()
    (full / "metrics.jsonl").write_bytes((tmp_path / "saved.jsonl").read_bytes())
    metrics.MetricsLog(full / "metrics.jsonl", enabled=True).write("save_failed", step=2, tag="epoch-001", message="")
    assert requeue.decide(full, 3)[1].startswith("a checkpoint could not be written")
    (tmp_path / "report.json").write_text("{}")
    assert requeue.decide(tmp_path, 3) == (False, "the run had finished")


def test_the_failed_record_names_the_tasks_srun_reported_in_this_attempt(tmp_path):
    from pipeline import requeue

    log = tmp_path / "srun.log"
    log.write_text(f"{requeue.ATTEMPT} 0\nsrun: error: n2: task 1: Killed\n{requeue.ATTEMPT} 1\nstep 5\n"
                   "srun: error: n1: task 0: Exited with exit code 1\nsrun: error: n2: tasks 2-3: Killed\n")
    assert requeue.dead_tasks(log) == ["task 0: Exited with exit code 1", "tasks 2-3: Killed"]
    assert requeue.dead_tasks(tmp_path / "absent.log") == [] and requeue.dead_tasks(None) == []


def full_disk_rank(rank: int, port: int, run_dir, out) -> None:
    """Two real ranks checkpoint once, then again with rank 0's write inside DeepSpeed's save (between its
    barriers) failing with ENOSPC."""
    import errno

    from pipeline import config, dsconfig
    from pipeline.train import checkpoint, engine, model

    start_rank(rank, 2, port)
    cfg = config.apply_overrides(config.preset("demo"), ["cluster.gpus_per_node=2", "train.micro_batch=4"])
    plan = config.resolve(cfg)
    torch.manual_seed(0)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))
    position, saved = {"epoch": 1, "step_in_epoch": 0}, config.to_dict(cfg)
    checkpoint.save(ds_engine, run_dir, "epoch-001", position, saved, keep=3)
    if rank == 0:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        ds_engine.checkpoint_engine.save = full
    started = time.time()
    try:
        checkpoint.save(ds_engine, run_dir, "epoch-002", position, saved, keep=3)
        outcome = "saved"
    except checkpoint.SaveFailed as err:
        outcome = str(err)
    torch.save({"outcome": outcome, "seconds": time.time() - started}, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_ends_every_rank_at_once_and_keeps_the_checkpoint_before(tmp_path):
    """ENOSPC in rank 0's write inside DeepSpeed's save: both ranks raise SaveFailed within seconds (none waits
    for the other in a barrier until the collective timeout, 30 minutes), naming the path, the free space
    and the size a checkpoint takes; the partial tag is gone, the complete one before it untouched and still
    `latest`."""
    from pipeline.train import tags

    run_dir = tmp_path / "run"
    start_ranks(full_disk_rank, pick_port(), run_dir, tmp_path, ranks=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    ckpt = run_dir / "checkpoints"
    for result in results:
        assert result["seconds"] < 60
        assert f"checkpoint {ckpt / 'epoch-002'} could not be written" in result["outcome"]
        assert "GiB free on that filesystem, a checkpoint takes" in result["outcome"]
        assert "the newest complete checkpoint, epoch-001, is untouched" in result["outcome"]
    assert "No space left on device" in results[0]["outcome"]
    assert "a write failed on another rank" in results[1]["outcome"]
    assert not (ckpt / "epoch-002").exists() and tags.check(ckpt / "epoch-001") is None
    assert tags.latest_tag(run_dir) == "epoch-001" == (ckpt / "latest").read_text()
