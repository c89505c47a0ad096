import json
import os
import time

import pytest
import torch
from helpers import pick_port, start_rank, start_ranks

from pipeline import config, dsconfig
from pipeline.data import streams
from pipeline.train import engine, loop, metrics, model, preempt


def plan_of(cfg):
    return cfg, config.resolve(cfg)


def shipped(precision="fp32"):
    return json.loads((dsconfig.PROJECT_ROOT / "ds_configs" / f"{precision}.json").read_text())


def test_shipped_configs_get_the_batch_keys_and_keep_the_recipe():
    cfg, plan = plan_of(config.preset("goyal_r50_bs8k"))
    ds = dsconfig.reconcile_ds_config(shipped(), "fp32.json", cfg, plan)
    assert ds["train_batch_size"] == 8192
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0
    assert ds["zero_optimization"]["stage"] == 0
    bf16 = config.apply_overrides(cfg, ["train.precision=bf16"])
    assert dsconfig.reconcile_ds_config(shipped("bf16"), "bf16.json", bf16, plan)["torch_autocast"]["enabled"] is True


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resolved_ds_config_of_the_8k_run_matches_its_golden_file(precision):
    """What DeepSpeed gets for goyal_r50_bs8k on 32 nodes x 8 GPUs (tests/golden/ds_config_bs8k_*.json)."""
    cfg, plan = plan_of(config.apply_overrides(config.preset("goyal_r50_bs8k"), [f"train.precision={precision}"]))
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (32, 8)
    golden = json.loads((dsconfig.PROJECT_ROOT / "tests" / "golden" / f"ds_config_bs8k_{precision}.json").read_text())
    assert dsconfig.load_ds_config(cfg, plan) == golden


def test_missing_clipping_key_becomes_zero_not_deepspeeds_one():
    cfg, plan = plan_of(config.preset("demo"))
    assert dsconfig.reconcile_ds_config({}, "x.json", cfg, plan)["gradient_clipping"] == 0


def test_a_missing_timers_key_turns_deepspeeds_synchronising_throughput_timer_off():
    cfg, plan = plan_of(config.preset("demo"))
    assert dsconfig.reconcile_ds_config({}, "x.json", cfg, plan)["timers"] == {"throughput": {"enabled": False}}
    unsynced = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert dsconfig.reconcile_ds_config(unsynced, "x.json", cfg, plan)["timers"] == unsynced["timers"]


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {"type": "Adam"}}, '"optimizer" must not be set'),
    ({"scheduler": {"type": "WarmupLR"}}, '"scheduler" must not be set'),
    ({"gradient_clipping": 1.0}, "gradient_clipping=1.0"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
    ({"train_batch_size": 4096}, "train_batch_size=4096 but the config gives 64"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}}, "casts BatchNorm to bf16"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "train.precision='fp32'"),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast.dtype='float16'"),
    ({"zero_optimization": {"overlap_comm": "yes"}}, "overlap_comm='yes'"),
    ({"zero_optimization": {"reduce_bucket_size": 0}}, "reduce_bucket_size=0"),
    ({"zero_optimization": {"reduce_bucket_size": 2.5}}, "reduce_bucket_size=2.5"),
    ({"zero_optimization": {"reduce_bucket_size": float("inf")}}, "reduce_bucket_size=inf"),
    ({"zero_optimization": {"reduce_bucket_size": float("nan")}}, "reduce_bucket_size=nan"),
    ({"timers": {"throughput": {"enabled": True}}}, "synchronises the device twice a step"),
])
def test_recipe_breaking_keys_are_rejected_naming_the_file(raw, message):
    cfg, plan = plan_of(config.preset("demo"))
    with pytest.raises(ValueError, match=r"my\.json: .*" + message.replace("(", r"\(").replace(".", r"\.")):
        dsconfig.reconcile_ds_config(raw, "my.json", cfg, plan)


def test_weight_decay_skips_bn_and_biases():
    cfg = config.preset("demo")
    net = model.build(cfg.model)
    decay, no_decay = engine.param_groups(net, cfg.optim)
    bn = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert {id(p) for p in no_decay["params"]} == bn | {id(net.fc.bias)}
    assert all(p.dim() > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    with_bn = config.apply_overrides(cfg, ["optim.weight_decay_bn=true"])
    assert {id(p) for p in engine.param_groups(net, with_bn.optim)[1]["params"]} == {id(net.fc.bias)}


def test_model_init_follows_the_paper():
    net = model.build(config.ModelConfig(arch="resnet50"))
    assert net.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    conv = net.layer3[0].conv2  # He init: std sqrt(2 / fan_out), fan_out = out_channels * k * k
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(type(m) is torch.nn.BatchNorm2d and m.momentum == 0.1 for m in bns)  # per-worker BN, no SyncBN
    assert all(block.bn3.weight.abs().sum() == 0 for layer in (net.layer1, net.layer4) for block in layer)
    assert net.layer1[0].conv2.stride == (1, 1) and net.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3
    with pytest.raises(ValueError, match="valid: .*resnet50"):
        model.build(config.ModelConfig(arch="vgg16"))
    plain = model.build(config.ModelConfig(arch="resnet50", zero_init_residual=False))
    assert all(block.bn3.weight.eq(1).all() for block in plain.layer1)  # zero-gamma is switchable


def test_model_width_narrows_every_stage_of_torchvisions_resnet_and_keeps_its_init():
    narrow = model.build(config.ModelConfig(arch="resnet10", num_classes=10, width=16))
    assert narrow.conv1.out_channels == narrow.bn1.num_features == 16
    assert [layer[0].conv2.out_channels for layer in (narrow.layer1, narrow.layer2, narrow.layer3, narrow.layer4)] == \
        [16, 32, 64, 128]
    assert narrow.fc.in_features == 128 and narrow.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert narrow.layer1[0].downsample is None  # the stem already has the first stage's channels
    assert all(layer[0].bn2.weight.abs().sum() == 0 for layer in (narrow.layer1, narrow.layer4))  # zero-gamma
    assert narrow(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    wide = model.build(config.ModelConfig(arch="resnet50", width=32))
    assert wide.layer4[0].conv3.out_channels == 1024 and wide.fc.in_features == 1024
    full = config.ModelConfig(arch="resnet50")
    assert model.parameter_count(full) == 25_557_032  # width 64 is torchvision's resnet50 itself
    with pytest.raises(ValueError, match="model.width=32 narrows only resnet10, resnet18"):
        model.build(config.ModelConfig(arch="wide_resnet50_2", width=32))


def test_torch_sgd_equals_the_papers_update_with_momentum_correction():
    """Paper eq. 10 with remark 2: v <- m (lr_new / lr_old) v + lr_new (g + wd w); w <- w - v.

    torch keeps lr outside the buffer, which is that corrected form; the lr changes at every step here.
    """
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), ["optim.nesterov=false"])
    plan = config.resolve(cfg)
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    layer = torch.nn.Linear(3, 5, bias=False)
    layer.weight.data.copy_(w0)
    opt = engine.build_optimizer(layer, cfg, plan)
    sched = engine.build_scheduler(opt, cfg, plan)
    w, v, lr_old = w0.clone().double(), torch.zeros(5, 3, dtype=torch.float64), None
    for g in grads:
        lr = opt.param_groups[0]["lr"]
        layer.weight.grad = g.clone()
        opt.step()
        sched.step()
        step = lr * (g.double() + cfg.optim.weight_decay * w)
        v = step if lr_old is None else cfg.optim.momentum * (lr / lr_old) * v + step
        w, lr_old = w - v, lr
        torch.testing.assert_close(layer.weight.data.double(), w, rtol=1e-5, atol=1e-7)
    assert lr_old > 0.1  # the schedule moved the lr during the test (warmup from 0.1)


@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_switch_reaches_the_update(nesterov):
    """Two steps with torch's forms: u <- m u + g'; Nesterov w -= lr (g' + m u), plain w -= lr u."""
    cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), [f"optim.nesterov={str(nesterov).lower()}"])
    plan = config.resolve(cfg)
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 5, bias=False)
    w = layer.weight.detach().clone().double()
    opt = engine.build_optimizer(layer, cfg, plan)
    m, lr, wd = cfg.optim.momentum, plan.peak_lr, cfg.optim.weight_decay
    u = torch.zeros_like(w)
    for _ in range(2):
        g = torch.randn(5, 3)
        layer.weight.grad = g.clone()
        opt.step()
        g_wd = g.double() + wd * w
        u = m * u + g_wd
        w = w - lr * (g_wd + m * u if nesterov else u)
        torch.testing.assert_close(layer.weight.data.double(), w, rtol=1e-5, atol=1e-7)


def test_precise_bn_sets_statistics_to_the_plain_average_over_batches():
    cfg = config.preset("demo")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    batches = [streams.Batch(torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8), torch.zeros(8), [], 0)
               for _ in range(4)]
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    net[0].running_mean.fill_(7.0)
    loop.precise_bn(net, iter(batches), 3, cfg, cpu)
    inputs = [loop.model_input(b.images, cfg, cpu) for b in batches[:3]]  # the 4th batch is never read
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    want_var = torch.stack([x.var(dim=(0, 2, 3)) for x in inputs]).mean(0)  # unbiased, as BN stores it
    torch.testing.assert_close(net[0].running_mean, want_mean)
    torch.testing.assert_close(net[0].running_var, want_var)
    assert net[0].momentum == 0.1 and net.training  # BN's own settings come back


def test_precise_bn_runs_under_the_trainings_autocast():
    """Under train.precision=bf16 the statistics come from the forwards training runs: in bf16 autocast."""
    seen = []
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    net[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batches = [streams.Batch(torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8), torch.zeros(8), [], 0)] * 2
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = config.apply_overrides(config.preset("demo"), [f"train.precision={precision}"])
        seen.clear()
        loop.precise_bn(net, iter(batches), 2, cfg, torch.device("cpu"))
        assert seen == [dtype, dtype]


def test_precise_bn_cannot_ask_for_more_batches_than_an_epoch_has():
    with pytest.raises(ValueError, match="train.precise_bn_batches=1000 exceeds the 937 micro-batches"):
        config.resolve(config.apply_overrides(config.preset("demo"), ["train.precise_bn_batches=1000"]))


def test_weight_decay_does_not_scale_with_the_batch():
    """Linear scaling changes the lr only (paper 2.1): weight decay is 1e-4 at 256 and at 8k."""
    for name in ("goyal_r50_bs256", "goyal_r50_bs8k"):
        cfg, plan = plan_of(config.preset(name))
        groups = engine.build_optimizer(torch.nn.Conv2d(3, 4, 3), cfg, plan).param_groups
        assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]


def test_the_per_batch_arithmetic_stays_on_the_models_device():
    """The meta device stands in for a GPU here (none is needed): an operand made on the CPU, such as
    torch.tensor(len(labels)), fails in torch.stack beside meta tensors as it would beside CUDA ones. Input
    normalisation, the forward, the training window's sums, the evaluation counts and the finite-loss flag run
    here on meta, and so does precise BN, which reads nothing on the host (torch's update_bn, which it replaced,
    read num_batches_tracked for every BN layer and batch: meta tensors refuse that, CUDA ones sync). What
    cannot: the collectives (gloo takes CPU tensors only) and DeepSpeed's engine."""
    cfg = config.preset("demo")
    meta = torch.device("meta")
    net = model.build(cfg.model).to(meta)
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4,)).to(meta)
    logits = loop.forward(net, images, cfg, meta)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    window = torch.zeros(4, dtype=torch.float64, device=meta)
    window += loop.window_sums(loss, logits, labels)
    stop = preempt.StopRequest()
    stop.note_loss(loss)
    stop.note_loss(loss)
    counts = torch.zeros(3, dtype=torch.float64, device=meta)
    counts += loop.hit_counts(loop.forward(net.eval(), images, cfg, meta), labels)
    assert window.device == counts.device == stop._finite.device == meta
    assert window.shape == (4,) and counts.shape == (3,)
    batch = streams.Batch(images, labels, [], 0)
    loop.precise_bn(net, iter([batch, batch]), 2, cfg, meta)
    assert net.bn1.running_mean.device == meta


def test_the_loss_and_the_counts_see_fp32_logits_of_a_bf16_model():
    """Under bf16 autocast the logits leave the engine in bf16; a log-softmax over 1,000 classes in bf16 (8 bits
    of mantissa) would round the loss to ~0.4%."""
    cfg = config.preset("demo")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, 10)).to(torch.bfloat16)
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    logits = loop.forward(lambda x: net(x.to(torch.bfloat16)), images, cfg, torch.device("cpu"))
    assert logits.dtype == torch.float32 and logits.shape == (4, 10)


def test_hit_counts_counts_top1_top5_and_images():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0.0, 9, 8, 7, 6, 5, 4], [1.0, 2, 3, 4, 5, 6, 7]])
    # row 0: top-1 hit; row 1: label 5 is 5th of its top 5; row 2: label 1 is outside its top 5
    assert loop.hit_counts(logits, torch.tensor([0, 5, 1])).tolist() == [1.0, 2.0, 3.0]


def data_wait_rank(rank: int, port: int, out, pause: float) -> None:
    """One rank training 6 steps of the demo's model on batches that take `pause` seconds each to arrive."""
    cfg = config.apply_overrides(config.preset("demo"), ["cluster.gpus_per_node=1", "train.micro_batch=8",
                                                         "train.log_every=3"])
    plan = config.resolve(cfg)
    device = start_rank(0, 1, port, cfg)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))

    def batches():
        for _ in range(6):
            time.sleep(pause)
            yield streams.Batch(torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                                [], 0)
    log = metrics.MetricsLog(out, enabled=True)
    loop.Trainer(ds_engine, cfg, plan, device, log, preempt.StopRequest()).train_epoch(batches(), 0)


@pytest.mark.slow
def test_progress_records_carry_the_share_of_time_spent_waiting_for_data(tmp_path):
    """The seconds a record says its rank waited (its share of the window's wall time, times the window's
    time: images over images/s) hold the batches' pauses, whatever the machine's load: at least 3 x 0.5 s
    in a window of 3 steps that waited, and an order of magnitude less where batches came at once."""
    waited = {}
    for pause in (0.0, 0.5):
        out = tmp_path / f"{pause}.jsonl"
        start_ranks(data_wait_rank, pick_port(), out, pause, ranks=1)
        records = metrics.read(out)
        assert [r["step"] for r in records] == [3, 6]
        waited[pause] = [r["data_wait"] * 3 * 8 / r["img_s"] for r in records]
        assert "waiting for data" in metrics.progress_line(records[0])
    assert min(waited[0.5]) >= 3 * 0.5 * 0.99  # the sleeps themselves (1 % for the clocks' rounding)
    assert max(waited[0.0]) < 0.15


def train_error_rank(rank: int, port: int, out, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One rank training 4 steps of 8 images (two records of 2 steps) at an lr too small to change a
    prediction."""
    cfg = config.apply_overrides(config.preset("demo"), ["cluster.gpus_per_node=1", "train.micro_batch=8",
                                                         "train.log_every=2", "optim.base_lr=1e-12"])
    plan = config.resolve(cfg)
    device = start_rank(0, 1, port, cfg)
    torch.manual_seed(0)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))
    batches = [streams.Batch(images[i * 8:(i + 1) * 8], labels[i * 8:(i + 1) * 8], [], 0) for i in range(4)]
    log = metrics.MetricsLog(out, enabled=True)
    loop.Trainer(ds_engine, cfg, plan, device, log, preempt.StopRequest()).train_epoch(iter(batches), 0)


@pytest.mark.slow
def test_train_iter_records_carry_the_training_error_of_their_window(tmp_path):
    """Fig. 2 plots training error: each record counts the top-1 misses of its window's images as they were
    trained on. The labels are made from the initial model's own predictions, so the count is known: in the
    first window 3 of 16 images get a wrong label, in the second 10 of 16."""
    cfg = config.apply_overrides(config.preset("demo"), ["train.micro_batch=8"])
    torch.manual_seed(0)
    net = model.build(cfg.model).train()  # the same initial weights as the rank's (seed 0)
    images = torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        predicted = torch.cat([net(loop.model_input(images[i:i + 8], cfg, torch.device("cpu"))).argmax(1)
                               for i in range(0, 32, 8)])  # per micro-batch of 8: BN over the same images
    wrong = torch.zeros(32, dtype=torch.bool)
    wrong[[0, 9, 15]] = True
    wrong[16:26] = True
    labels = torch.where(wrong, (predicted + 1) % 10, predicted)
    out = tmp_path / "metrics.jsonl"
    start_ranks(train_error_rank, pick_port(), out, images, labels, ranks=1)
    records = metrics.read(out)
    assert [r["step"] for r in records] == [2, 4]
    assert [r["train_err"] for r in records] == [pytest.approx(100 * 3 / 16), pytest.approx(100 * 10 / 16)]
    assert "train_err 18.75%" in metrics.progress_line(records[0])


def decode_mode_rank(rank: int, port: int, shard_dir, mode: str, out) -> None:
    """Six steps of the demo's model on one rank from the real shards, decoding with data.decode=mode."""
    from pipeline.data.manifest import load_manifest

    cfg = config.apply_overrides(config.preset("demo"), [
        "cluster.gpus_per_node=1", "train.micro_batch=8", "train.log_every=1000", f"data.shards={shard_dir}",
        "data.train_samples=240", "data.val_samples=70", "data.workers=0", f"data.decode={mode}"])
    plan = config.resolve(cfg)
    device = start_rank(0, 1, port, cfg)
    torch.manual_seed(cfg.train.seed)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))
    stream = streams.train_stream(load_manifest(shard_dir, "train"), cfg.data, 8, 6, 0, 1, 1, cfg.train.seed)
    stream.set_epoch(0)
    log = metrics.MetricsLog(out, enabled=False)
    loop.Trainer(ds_engine, cfg, plan, device, log, preempt.StopRequest()).train_epoch(iter(stream), 0)
    torch.save(ds_engine.module.state_dict(), out)


@pytest.mark.slow
def test_decoding_in_the_rank_trains_to_the_weights_of_decoding_in_the_loader(shard_dir, tmp_path):
    """data.decode=gpu (its decode here on the CPU rank) against the loader's decode, six steps: the same crops
    and flips, the same full-size decodes, so the same weights, bit for bit."""
    weights = {}
    for mode in ("cpu", "gpu"):
        out = tmp_path / f"{mode}.pt"
        start_ranks(decode_mode_rank, pick_port(), shard_dir, mode, out, ranks=1)
        weights[mode] = torch.load(out)
    assert weights["cpu"].keys() == weights["gpu"].keys()
    assert all(torch.equal(weights["cpu"][k], weights["gpu"][k]) for k in weights["cpu"])
    torch.manual_seed(config.preset("demo").train.seed)  # the ranks' initial weights: the steps changed them
    assert not torch.equal(weights["cpu"]["fc.weight"], model.build(config.preset("demo").model).fc.weight)


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Records where every call that makes the host wait for the device comes from: a read of a tensor's
    value (.item, .tolist, .cpu, .numpy, bool/int/float of a tensor) or a tensor made on a device from Python
    values (torch.tensor(..., device=...): a host-to-device copy)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS or (func is torch.tensor and kwargs.get("device") is not None):
            import traceback

            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            self.calls.append(f"{os.path.basename(caller.filename)}:{caller.name}")
        return func(*args, **kwargs)


def sync_count_rank(rank: int, port: int, out) -> None:
    """Six optimizer steps (of two micro-batches) of the demo's model through a real DeepSpeed engine and
    train_epoch, after a first one, counting the synchronising calls (and the accelerator's own synchronize)
    made while they run."""
    import collections

    from deepspeed.accelerator import get_accelerator

    cfg = config.apply_overrides(config.preset("demo"), ["cluster.gpus_per_node=1", "train.micro_batch=8",
                                                         "train.log_every=1000", "train.grad_accum=2"])
    plan = config.resolve(cfg)
    device = start_rank(0, 1, port, cfg)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))
    batches = [streams.Batch(torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,)),
                             [], 0) for _ in range(14)]
    log = metrics.MetricsLog(out, enabled=False)
    loop.Trainer(ds_engine, cfg, plan, device, log, preempt.StopRequest()).train_epoch(iter(batches[:2]), 0)
    accelerator, synchronized = get_accelerator(), []
    accelerator.synchronize = lambda *a, **k: synchronized.append(1)  # DeepSpeed's timers would call it
    trainer = loop.Trainer(ds_engine, cfg, plan, device, log, preempt.StopRequest())  # after a first use above
    with SyncCounter() as counter:
        trainer.train_epoch(iter(batches[2:]), 0)
    torch.save({"calls": collections.Counter(counter.calls), "synchronize": len(synchronized),
                "steps": ds_engine.global_steps}, out)


@pytest.mark.slow
def test_a_training_step_makes_no_host_sync_but_the_lagged_read_of_the_stop_flags(tmp_path):
    """Per optimizer step the host reads one value from the device: the stop flags of the step before,
    whose allreduce is done by then (on CUDA through a pinned copy and an event: preempt.poll). The loss,
    the training error and the learning rate stay on the device or on the host until a record is written;
    DeepSpeed (timers off, no clipping, ZeRO 0) reads nothing. A sync added to the loop, to the engine's
    step or to DeepSpeed's path fails this test, naming where it came from."""
    out = tmp_path / "syncs.pt"
    start_ranks(sync_count_rank, pick_port(), out, ranks=1)
    result = torch.load(out, weights_only=False)
    assert result["steps"] == 1 + 6
    # 6 polls, the first with nothing to read; then, once an epoch, the corrupt-sample count (a tensor made
    # on the device and read back)
    assert dict(result["calls"]) == {"preempt.py:_read_pending": 5, "loop.py:train_epoch": 2}
    assert result["synchronize"] == 0


def compiled_rank(rank: int, port: int, out) -> None:
    """Three steps of the demo's model from one initialisation on fixed batches, eager and compiled, on the
    rank's device (NCCL and cuda:0 where a GPU is visible, else gloo and the CPU): the batches go where the
    engine's model is."""
    torch.manual_seed(0)
    batches = [streams.Batch(torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,)),
                             [], 0) for _ in range(3)]
    result, device = {}, None
    for compiled in (False, True):
        cfg = config.apply_overrides(config.preset("demo"), ["cluster.gpus_per_node=1", "train.micro_batch=8",
                                                             "train.log_every=1", f"train.compile={compiled}",
                                                             "cluster.backend=auto"])
        plan = config.resolve(cfg)
        device = device or start_rank(0, 1, port, cfg)  # torch.distributed once; both runs on its device
        torch.manual_seed(0)
        ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan),
                                        channels_last=device.type == "cuda")
        assert next(ds_engine.module.parameters()).device.type == device.type
        log = out.with_suffix(f".{compiled}.jsonl")
        trainer = loop.Trainer(ds_engine, cfg, plan, device, metrics.MetricsLog(log, enabled=True),
                               preempt.StopRequest())
        trainer.train_epoch(iter(batches), 0)
        result[compiled] = {"loss": [r["loss"] for r in metrics.read(log)],
                            "weights": {k: v.cpu().clone() for k, v in ds_engine.module.state_dict().items()},
                            "compiled": ds_engine.is_compiled}
    torch.save(result, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="compiling takes about a minute on 2 CPU cores; runs with the GPU tests (benchmarks/gpu.sh)")
def test_compiled_steps_equal_eager_ones(tmp_path):
    """train.compile=true: the same losses and weights after three steps, within float rounding (inductor
    fuses and reorders arithmetic). On a GPU the steps run on cuda:0 over NCCL; it also passes on a CPU
    (measured when it was written: 50 s of compiling)."""
    out = tmp_path / "compiled.pt"
    start_ranks(compiled_rank, pick_port(), out, ranks=1)
    result = torch.load(out, weights_only=False)
    assert result[True]["compiled"] and not result[False]["compiled"]
    assert result[True]["loss"] == pytest.approx(result[False]["loss"], rel=1e-4)
    for name, eager in result[False]["weights"].items():
        torch.testing.assert_close(result[True]["weights"][name], eager, rtol=1e-4, atol=1e-5, msg=name)
