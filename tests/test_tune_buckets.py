"""python -m pipeline.tune_buckets as a job through the launcher (submitit's local executor, 2 gloo ranks)."""

import json

import pytest
from pipeline import config, dsconfig
from pipeline.scaling import model as scaling
from pipeline.submit import main as submit_main
from pipeline.tune_buckets import main as tune_main

from helpers import run_here, run_module


@pytest.mark.slow
def test_tuning_job_writes_the_best_setting_the_plot_and_the_hardware_profile(weird_root, capsys):
    run = weird_root / "tune run"
    tuned = weird_root / "tuned ds.json"
    result = run_module("pipeline.tune_buckets", "--cluster", "local", "--run-dir", str(run), "--sizes", "100000,1e9",
                        "--steps", "1", "--rounds", "2", "--write", str(tuned))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((run / "tune.json").read_text())
    assert set(measured["median_step_s"]) == {"off", "100000", "1000000000"}
    assert all(len(times) == 2 for times in measured["candidates_s"].values())
    best = measured["best"]
    assert measured["median_step_s"][best] == min(measured["median_step_s"].values())
    assert "<- best" in result.stdout and "off (DeepSpeed)" in result.stdout
    zero = json.loads(tuned.read_text())["zero_optimization"]
    assert zero["overlap_comm"] == (best != "off")
    assert best == "off" or zero["reduce_bucket_size"] == int(best)
    cfg = config.preset("demo")  # the tuned JSON is one training accepts
    dsconfig.reconcile_ds_config(json.loads(tuned.read_text()), str(tuned), cfg, config.resolve(cfg))
    assert (run / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hardware = scaling.load_hardware(str(run / "hardware.json"))
    assert (hardware.arch, hardware.gpus_per_node, hardware.inter) == ("resnet10", 2, None)
    assert hardware.intra.bandwidth_Bps > 0 and hardware.backward_s > 0 and hardware.forward_s > 0
    dry = run_here(submit_main, capsys, "--dry-run", "--hardware", str(run / "hardware.json"))
    assert dry.returncode == 0 and f"predicted on measured-{run.name}" in dry.stdout, dry.stderr
    more = run_here(submit_main, capsys, "--dry-run", "--hardware", str(run / "hardware.json"), "--nodes", "2",
                    "--cluster", "local")
    assert "no prediction: hardware measured-tune run has no inter-node measurement" in more.stdout


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "big"], "--sizes 'big': give bucket sizes in elements"),
    (["--sizes", "0"], "at least one bucket size of 1 element or more"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--sweep", "train.micro_batch=8,16"], "unrecognized arguments: --sweep"),
    (["--write", "/proc/nope/ds.json"], "--write /proc/nope/ds.json: cannot write"),
])
def test_bad_tuning_flags_are_refused_before_anything_runs(flags, message, tmp_path, capsys):
    result = run_here(tune_main, capsys, "--cluster", "local", "--run-dir", str(tmp_path / "run"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_tuning_help_shows_no_training_only_flags(capsys):
    shown = run_here(tune_main, capsys, "--help")
    assert shown.returncode == 0 and "--sizes" in shown.stdout
    assert not any(flag in shown.stdout for flag in ("--signal-delay", "--max-requeues", "--sweep"))
