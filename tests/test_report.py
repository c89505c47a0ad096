from pipeline import config
from pipeline.train import report


def evals(errors):
    return [{"_type": "eval", "epoch": e, "top1_err": err, "top5_err": 1.0, "num_samples": 50_000,
             "epoch_s": 10.0, "step": 156 * (e + 1)} for e, err in enumerate(errors)]


def test_reported_error_is_the_median_of_the_last_five_epochs():
    """The paper reports the median top-1 error of the last 5 epochs."""
    summary = report.summarize(evals([40, 30, 26, 24.5, 23.9, 23.5, 24.1]), [])
    assert summary["median_last5_top1_err"] == 24.1  # median of 26, 24.5, 23.9, 23.5, 24.1
    assert summary["final_top1_err"] == 24.1 and summary["best_top1_err"] == 23.5 and summary["epochs"] == 7


def test_a_resumed_epoch_counts_once_with_its_later_record():
    first, again = evals([30, 25]), evals([30, 24])  # epoch 1 logged, then trained again after a requeue
    latest = report._latest(first + again[1:], "eval", "epoch")
    assert [r["top1_err"] for r in latest] == [30, 24]


def test_the_pictures_lr_line_holds_every_warmup_step_from_base_lr_to_the_peak(tmp_path):
    """curves.png's lr panel draws the run's schedule from its config.json: every step of the gradual warmup
    (records every train.log_every steps would show two or three points of it), base_lr to the peak, then the
    decays."""
    cfg = config.preset("demo")
    plan = config.resolve(cfg)
    config.save_run_config(tmp_path, cfg, plan)
    epochs, lrs = report.schedule(tmp_path)
    warmup = lrs[:plan.warmup_steps + 1]
    assert plan.warmup_steps > cfg.train.log_every and len(lrs) <= 2100
    assert epochs[:plan.warmup_steps + 1] == [s / plan.steps_per_epoch for s in range(plan.warmup_steps + 1)]
    assert warmup[0] == cfg.optim.base_lr and warmup[-1] == plan.peak_lr
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert lrs[-1] == plan.peak_lr * cfg.schedule.gamma ** len(cfg.schedule.milestones)
