import pytest
from pipeline import config
from pipeline.train import schedule

from helpers import GOLDEN_8K


@pytest.mark.parametrize("epoch, lr", GOLDEN_8K)
def test_golden_table_8k(epoch, lr):
    cfg = config.preset("goyal_r50_bs8k")
    plan = config.resolve(cfg)
    step = round(epoch * plan.steps_per_epoch)
    assert schedule.lr_at(step, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(lr)


def test_warmup_changes_every_iteration_by_a_constant():
    cfg = config.preset("goyal_r50_bs8k")
    plan = config.resolve(cfg)
    lrs = [schedule.lr_at(s, cfg.optim.base_lr, plan, cfg.schedule) for s in range(plan.warmup_steps + 1)]
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx((3.2 - 0.1) / plan.warmup_steps) for d in steps)


def test_no_warmup_at_the_reference_batch():
    cfg = config.preset("goyal_r50_bs256")
    plan = config.resolve(cfg)
    assert schedule.lr_at(0, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(0.1)


def test_cosine_option_keeps_the_warmup_then_falls_from_peak_to_zero():
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["schedule.kind=cosine"])
    plan = config.resolve(cfg)
    lr = [schedule.lr_at(s, cfg.optim.base_lr, plan, cfg.schedule) for s in range(plan.total_steps + 1)]
    step_cfg = config.preset("goyal_r50_bs8k")
    assert lr[: plan.warmup_steps] == [schedule.lr_at(s, 0.1, plan, step_cfg.schedule) for s in range(plan.warmup_steps)]
    assert lr[plan.warmup_steps] == pytest.approx(3.2)
    assert lr[(plan.warmup_steps + plan.total_steps) // 2] == pytest.approx(1.6)
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in zip(lr[plan.warmup_steps:], lr[plan.warmup_steps + 1:]))


def test_unknown_schedule_kind_is_refused():
    with pytest.raises(ValueError, match="schedule.kind='linear'; valid: step, cosine"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["schedule.kind=linear"]))


def test_constant_warmup_holds_the_base_lr_then_jumps_to_the_peak():
    """The paper's ablation (2.2, 25.88% at 8k): 0.1 for 5 epochs, then 3.2, then the same decays."""
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["schedule.warmup=constant"])
    plan = config.resolve(cfg)
    lr = [schedule.lr_at(s, cfg.optim.base_lr, plan, cfg.schedule) for s in range(plan.total_steps)]
    assert plan.warmup_steps == 780
    assert set(lr[:780]) == {0.1} and lr[780] == pytest.approx(3.2)
    gradual = config.preset("goyal_r50_bs8k")
    assert lr[780:] == [schedule.lr_at(s, 0.1, plan, gradual.schedule) for s in range(780, plan.total_steps)]


@pytest.mark.parametrize("kn, peak", [(256, 0.1), (1024, 0.2), (8192, 0.1 * 32 ** 0.5)])
def test_square_root_scaling_multiplies_the_base_lr_by_the_root_of_kn_over_256(kn, peak):
    """The rule the paper compares with linear scaling (26.22% at 8k): peak = 0.1 * sqrt(kn / 256)."""
    cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), ["optim.scaling=sqrt", f"train.grad_accum={kn // 256}"])
    plan = config.resolve(cfg)
    assert plan.peak_lr == pytest.approx(peak)
    assert schedule.lr_at(plan.warmup_steps, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(peak)
    assert f"peak_lr={peak:g} (0.1 x sqrt {kn}/256)" in plan.summary(cfg)


@pytest.mark.parametrize("item, message", [("schedule.warmup=linear", "schedule.warmup='linear'; valid: gradual, constant"),
                                           ("optim.scaling=log", "optim.scaling='log'; valid: linear, sqrt")])
def test_unknown_warmup_or_scaling_rule_is_refused(item, message):
    with pytest.raises(ValueError, match=message):
        config.resolve(config.apply_overrides(config.preset("demo"), [item]))
