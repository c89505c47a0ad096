"""Past the paper's 8k: LARS, label smoothing, the polynomial decay and the 32k preset."""

import json

import pytest
import torch
from helpers import SMALL, run_here, run_module

from pipeline import config
from pipeline.submit import main as submit_main
from pipeline.train import engine, loop, metrics, schedule

# lars_r50_bs32k: 1,281,167 // 32768 = 39 steps an epoch, warmup 14 x 39 = 546 steps, 90 x 39 = 3510 in all;
# the lr at these epochs (step = epoch x 39): 0.25 -> 32 linearly, then 32 (1 - (step - 546) / 2964) ** 2.
GOLDEN_32K = [(0, 0.25), (7, 16.125), (14, 32.0), (33, 18.0), (52, 8.0), (71, 2.0), (90, 0.0)]


def test_the_32k_preset_plan_is_golden():
    cfg = config.preset("lars_r50_bs32k")
    plan = config.resolve(cfg)
    assert (plan.world_size, plan.global_batch, plan.peak_lr) == (1024, 32768, 32.0)
    assert (plan.steps_per_epoch, plan.warmup_steps, plan.total_steps) == (39, 546, 3510)
    assert (cfg.optim.kind, cfg.schedule.kind, cfg.train.label_smoothing) == ("lars", "poly", 0.1)
    assert "optim=lars schedule=poly label_smoothing=0.1" in plan.summary(cfg)


@pytest.mark.parametrize("epoch, lr", GOLDEN_32K)
def test_golden_poly_schedule_of_the_32k_preset(epoch, lr):
    cfg = config.preset("lars_r50_bs32k")
    plan = config.resolve(cfg)
    assert schedule.lr_at(epoch * plan.steps_per_epoch, cfg.optim.base_lr, plan, cfg.schedule) == pytest.approx(lr)


def test_the_32k_preset_dry_run_shows_its_plan(capsys):
    result = run_here(submit_main, capsys, "--preset", "lars_r50_bs32k", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "global_batch=32768" in result.stdout and "steps/epoch=39" in result.stdout
    assert "warmup_steps=546 total_steps=3510" in result.stdout and "optim=lars schedule=poly" in result.stdout


class Tiny(torch.nn.Module):
    """A conv (weight decayed and adapted), its BN (neither) and a linear layer (weight adapted, bias not)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("overrides", [[], ["optim.nesterov=true"], ["optim.weight_decay=0"]])
def test_lars_steps_equal_the_written_out_formula(overrides):
    """Three steps (the lr moving with the warmup) of build_optimizer under the 32k preset: for a tensor with
    weight decay, g' = g + wd w, ratio = eta ||w|| / (||g|| + wd ||w|| + 1e-8), u <- m u + ratio g', and
    w <- w - lr u (Nesterov: w <- w - lr (ratio g' + m u)); BN parameters and biases take u <- m u + g with no
    decay and no ratio. At weight decay 0 the decayed tensors are still adapted."""
    cfg = config.apply_overrides(config.preset("lars_r50_bs32k"), overrides)
    plan = config.resolve(cfg)
    m, wd, eta = cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.trust_coefficient
    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
    opt = engine.build_optimizer(net, cfg, plan)
    sched = engine.build_scheduler(opt, cfg, plan)
    names = dict(net.named_parameters())
    expected = {name: p.detach().clone().double() for name, p in names.items()}
    buffers = {name: torch.zeros_like(w) for name, w in expected.items()}
    adapted = {"conv.weight", "fc.weight"}
    for _ in range(3):
        lr = sched.get_last_lr()[0]
        grads = {name: torch.randn_like(p) * 0.01 for name, p in names.items()}
        for name, p in names.items():
            p.grad = grads[name].clone()
        opt.step()
        sched.step()
        for name, w in expected.items():
            g = grads[name].double()
            if name in adapted:
                g = (eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)) * (g + wd * w)
            buffers[name] = m * buffers[name] + g
            expected[name] = w - lr * (g + m * buffers[name] if cfg.optim.nesterov else buffers[name])
        for name, p in names.items():
            torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-5, atol=1e-8, msg=name)
    assert sched.get_last_lr()[0] > 0.25  # the warmup moved the lr


def test_label_smoothing_puts_one_minus_s_plus_s_over_c_on_the_label():
    """Two images, three classes, s = 0.1: the target is 0.9 + 0.1/3 on the label and 0.1/3 elsewhere."""
    cfg = config.apply_overrides(config.preset("demo"), ["train.label_smoothing=0.1"])
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    log_p = logits.log_softmax(1)
    target = torch.full((2, 3), 0.1 / 3)
    target[0, 0] += 0.9
    target[1, 2] += 0.9
    assert loop.training_loss(logits, labels, cfg).item() == pytest.approx(-(target * log_p).sum(1).mean().item())
    plain = config.preset("demo")
    assert loop.training_loss(logits, labels, plain).item() == pytest.approx(-(log_p[0, 0] + log_p[1, 2]).item() / 2)


@pytest.mark.parametrize("key, value, message", [
    ("optim.kind", "adam", "optim.kind='adam'; valid: sgd, lars"),
    ("optim.trust_coefficient", "0", "optim.trust_coefficient=0.0 must be a finite number above 0"),
    ("train.label_smoothing", "1", "train.label_smoothing=1.0 must be in [0, 1)"),
    ("schedule.kind", "exp", "schedule.kind='exp'; valid: step, cosine, poly"),
])
def test_bad_large_batch_values_are_refused_before_anything_runs(key, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.resolve(config.apply_overrides(config.preset("lars_r50_bs32k"), [f"{key}={value}"]))


@pytest.mark.slow
def test_a_two_rank_lars_run_with_smoothing_and_the_poly_decay_trains(shard_dir, tmp_path):
    run_dir = tmp_path / "lars"
    args = ["--cluster", "local", "--run-dir", str(run_dir), f"data.shards={shard_dir}", *SMALL,
            "optim.kind=lars", "train.label_smoothing=0.1", "schedule.kind=poly", "optim.base_lr=1"]
    result = run_module("pipeline.submit", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert (saved["optim"]["kind"], saved["schedule"]["kind"], saved["train"]["label_smoothing"]) == ("lars", "poly", 0.1)
    records = metrics.read(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["_type"] == "train_iter"]
    evals = [r for r in records if r["_type"] == "eval"]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 and evals[-1]["top1_err"] < 88
