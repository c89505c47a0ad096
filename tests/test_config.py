import dataclasses
import json

import pytest
from pipeline import config


def test_paper_8k_arithmetic():
    cfg = config.preset("goyal_r50_bs8k")
    plan = config.resolve(cfg)
    assert plan.world_size == 256
    assert plan.global_batch == 8192
    assert plan.peak_lr == pytest.approx(3.2)
    assert plan.steps_per_epoch == 156  # 1,281,167 images // 8192
    assert plan.warmup_steps == 5 * 156
    assert plan.total_steps == 90 * 156
    assert "global_batch=8192 (32/gpu x 256 x accum 1)" in plan.summary(cfg)


def test_paper_256_baseline_needs_no_warmup():
    plan = config.resolve(config.preset("goyal_r50_bs256"))
    assert (plan.global_batch, plan.peak_lr, plan.warmup_steps, plan.steps_per_epoch) == (256, 0.1, 0, 5004)


def test_grad_accum_emulates_the_larger_batch():
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["cluster.nodes=16", "train.grad_accum=2"])
    plan = config.resolve(cfg)
    assert (plan.global_batch, plan.peak_lr, plan.steps_per_epoch) == (8192, pytest.approx(3.2), 156)


def test_overrides_are_typed():
    cfg = config.apply_overrides(config.preset("demo"), [
        "optim.base_lr=0.2", "schedule.milestones=3,6", "optim.nesterov=false", "train.micro_batch=16"])
    assert cfg.optim.base_lr == 0.2 and isinstance(cfg.optim.base_lr, float)
    assert cfg.schedule.milestones == (3.0, 6.0)
    assert cfg.optim.nesterov is False
    assert cfg.train.micro_batch == 16


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lr'.*optim\.base_lr"):
        config.apply_overrides(config.preset("demo"), ["optim.lr=0.1"])


@pytest.mark.parametrize("item, message", [
    ("train.micro_batch=3.5", "not a valid int"),
    ("optim.nesterov=maybe", "expected true or false"),
    ("optim.base_lr", "not key=value"),
])
def test_bad_override_values(item, message):
    with pytest.raises(ValueError, match=message):
        config.apply_overrides(config.preset("demo"), [item])


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.preset("demo").optim.base_lr = 1.0


def test_impossible_plans_are_refused():
    with pytest.raises(ValueError, match="precision"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["train.precision=fp8"]))
    with pytest.raises(ValueError, match="no full step"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["data.train_samples=10"]))
    with pytest.raises(ValueError, match=r"data.shard_url='s3://b/x.tar' lacks \{name\}"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["data.shard_url=s3://b/x.tar"]))


def test_ranks_read_whole_accumulation_windows_of_micro_batches():
    # 1000 samples over 3 ranks: 333 each, 41 micro-batches of 8, 40 in whole windows of 4
    assert config.micro_batches_per_rank(1000, 3, 8, 1) == 41
    assert config.micro_batches_per_rank(1000, 3, 8, 4) == 40


def test_run_config_round_trip(tmp_path):
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["schedule.milestones=30,60"])
    plan = config.resolve(cfg)
    config.save_run_config(tmp_path, cfg, plan)
    assert config.load_run_config(tmp_path) == (cfg, plan)


def test_tampered_run_config_is_refused(tmp_path):
    cfg = config.preset("demo")
    config.save_run_config(tmp_path, cfg, config.resolve(cfg))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["plan"]["peak_lr"] = 9.9
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not follow"):
        config.load_run_config(tmp_path)


@pytest.mark.parametrize("item, message", [
    ("optim.base_lr=0", "optim.base_lr=0.0 must be a finite number above 0"),
    ("optim.base_lr=nan", "optim.base_lr=nan must be a finite number above 0"),
    ("optim.base_lr=inf", "optim.base_lr=inf must be a finite number above 0"),
    ("optim.momentum=-0.1", "optim.momentum=-0.1 must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001 must be finite and 0 or more"),
    ("schedule.gamma=-0.1", "schedule.gamma=-0.1 must be in (0, 1]"),
    ("schedule.milestones=60,30", "schedule.milestones=(60.0, 30.0) must be finite epochs, 0 or more, in increasing order"),
    ("schedule.milestones=-1,30", "must be finite epochs, 0 or more"),
    ("model.fc_init_std=0", "model.fc_init_std=0.0 must be a finite number above 0"),
    ("schedule.warmup_epochs=inf", "schedule.warmup_epochs=inf must be finite and 0 or more"),
])
def test_values_the_optimizer_schedule_or_model_would_reject_are_refused_before_submitting(item, message):
    with pytest.raises(ValueError) as err:
        config.resolve(config.apply_overrides(config.preset("goyal_r50_bs256"), [item]))
    assert message in str(err.value)


def test_nesterov_without_momentum_is_refused_before_torch_would():
    cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), ["optim.momentum=0"])
    with pytest.raises(ValueError, match="optim.nesterov=true needs optim.momentum above 0"):
        config.resolve(cfg)
    config.resolve(config.apply_overrides(cfg, ["optim.nesterov=false"]))


def test_tuple_overrides_take_the_list_syntax_that_list_keys_prints():
    cfg = config.apply_overrides(config.preset("demo"), ["data.mean=[0.1, 0.2, 0.3]", "data.std=(0.3,0.3,0.3)"])
    assert cfg.data.mean == (0.1, 0.2, 0.3) and cfg.data.std == (0.3, 0.3, 0.3)


def test_a_config_saved_before_a_key_existed_compares_with_that_keys_default():
    """A run folder from an earlier version lacks the keys added since: they count as their defaults, so the
    run resumes, and a value other than the default is still named."""
    old = config.to_dict(config.preset("demo"))
    del old["optim"]["kind"], old["train"]["label_smoothing"]
    assert config.differences(old, config.to_dict(config.preset("demo"))) == []
    lars = config.apply_overrides(config.preset("demo"), ["optim.kind=lars"])
    assert config.differences(old, config.to_dict(lars)) == ["optim.kind: 'sgd' -> 'lars'"]
