"""Real DeepSpeed engines on real processes (gloo): data parallelism equals one big batch."""


import pytest
import torch
from pipeline import config, dsconfig
from pipeline.data import streams, workers
from pipeline.data.manifest import load_manifest
from pipeline.train import distributed, engine, loop, model

from helpers import GOLDEN_8K, start_rank, start_ranks

WORLD = 2
STEPS = 2


def small_config(shard_dir) -> config.Config:
    return config.apply_overrides(config.preset("demo"), [
        f"data.shards={shard_dir}", "data.train_samples=240", "data.val_samples=70", "data.workers=0",
        "train.micro_batch=8", f"cluster.gpus_per_node={WORLD}"])


def batches(cfg, rank, world):
    manifest = load_manifest(cfg.data.shards, "train")
    stream = streams.TrainStream(manifest, cfg.data, cfg.train.micro_batch, STEPS, rank, world, cfg.train.seed)
    stream.set_epoch(0)
    cpu = torch.device("cpu")
    return [(loop.model_input(b.images, cfg, cpu), b.labels) for b in workers.loader(stream, cfg.data, False)]


def start_engine(cfg, rank, world, port):
    """A real DeepSpeed engine on rank `rank` of `world` processes (gloo), model seeded with 0."""
    plan = config.resolve(cfg)
    start_rank(rank, world, port, cfg)
    torch.manual_seed(0)
    return engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan))


def rank_main(rank, shard_dir, port, out_dir):
    cfg = small_config(shard_dir)
    ds_engine = start_engine(cfg, rank, WORLD, port)
    ds_engine.eval()  # BN on running stats: per-worker batch stats differ from the big batch's by design
    for x, y in batches(cfg, rank, WORLD):
        ds_engine.backward(torch.nn.functional.cross_entropy(ds_engine(x), y))
        ds_engine.step()
    state = {k: v.clone() for k, v in ds_engine.module.state_dict().items()}
    ds_engine.train()
    with torch.no_grad():
        ds_engine(x)  # this rank's own batch moves its BN running statistics away from the other rank's
    bn = ds_engine.module.bn1
    before = (bn.running_mean.clone(), bn.running_var.clone())
    distributed.average_bn_statistics(ds_engine.module)
    torch.save({"state": state, "lr": ds_engine.get_lr()[0], "bn_before": before,
                "bn_after": (bn.running_mean, bn.running_var)}, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_result(shard_dir, tmp_path_factory, free_port):
    out = tmp_path_factory.mktemp("ranks")
    start_ranks(rank_main, shard_dir, free_port, out, ranks=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def reference_step(cfg):
    """One process, torch SGD, the concatenated batch of both ranks: what the paper's update gives."""
    plan = config.resolve(cfg)
    torch.manual_seed(0)
    net = model.build(cfg.model).eval()
    opt = engine.build_optimizer(net, cfg, plan)
    sched = engine.build_scheduler(opt, cfg, plan)
    per_rank = [batches(cfg, r, WORLD) for r in range(WORLD)]
    for step in range(STEPS):
        x = torch.cat([per_rank[r][step][0] for r in range(WORLD)])
        y = torch.cat([per_rank[r][step][1] for r in range(WORLD)])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()
    return net.state_dict(), opt.param_groups[0]["lr"]


@pytest.mark.slow
def test_ranks_hold_identical_parameters(two_rank_result):
    a, b = (r["state"] for r in two_rank_result)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_rank_evaluates_with_the_mean_of_the_ranks_bn_statistics(two_rank_result):
    before = [r["bn_before"] for r in two_rank_result]
    assert not torch.equal(before[0][0], before[1][0])  # per-rank statistics (paper 2.3), no SyncBN
    for i in range(2):  # running_mean, running_var
        mean = (before[0][i] + before[1][i]) / 2
        for result in two_rank_result:
            torch.testing.assert_close(result["bn_after"][i], mean)


def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_result, shard_dir):
    want, lr = reference_step(small_config(shard_dir))
    got = two_rank_result[0]["state"]
    torch.manual_seed(0)
    initial = model.build(small_config(shard_dir).model).state_dict()
    assert max((want[k] - initial[k]).abs().max() for k in want if want[k].is_floating_point()) > 1e-4  # the step changed the weights, so the comparison below means something
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    assert two_rank_result[0]["lr"] == pytest.approx(lr)  # DeepSpeed stepped our schedule once per step


def accum_main(rank, shard_dir, port, out_dir):
    """One process accumulating the two ranks' micro-batches: gradient_accumulation_steps=2, same kn."""
    data_cfg = small_config(shard_dir)
    cfg = config.apply_overrides(data_cfg, ["cluster.gpus_per_node=1", "train.grad_accum=2"])
    ds_engine = start_engine(cfg, 0, 1, port + 2)
    ds_engine.eval()
    per_rank = [batches(data_cfg, r, WORLD) for r in range(WORLD)]
    for step in range(STEPS):
        for r in range(WORLD):
            x, y = per_rank[r][step]
            ds_engine.backward(torch.nn.functional.cross_entropy(ds_engine(x), y))
            ds_engine.step()
    torch.save({"state": ds_engine.module.state_dict(), "lr": ds_engine.get_lr()[0],
                "steps": ds_engine.global_steps}, out_dir / "accum.pt")


def test_k_ranks_equal_one_rank_accumulating_k_micro_batches(two_rank_result, shard_dir, tmp_path, free_port):
    start_ranks(accum_main, shard_dir, free_port, tmp_path, ranks=1)
    result = torch.load(tmp_path / "accum.pt")
    assert result["steps"] == STEPS and result["lr"] == pytest.approx(two_rank_result[0]["lr"])
    want = two_rank_result[0]["state"]
    for key in want:
        torch.testing.assert_close(result["state"][key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def schedule_main(rank, port, out_dir):
    """The 8k plan (kn=8192, 156 steps/epoch) in one process, a tiny model, every optimizer step of 90 epochs."""
    cfg = config.apply_overrides(config.preset("goyal_r50_bs8k"), [
        "cluster.nodes=1", "cluster.gpus_per_node=1", "train.micro_batch=8192", "cluster.cpus_per_task=1"])
    plan = config.resolve(cfg)
    start_rank(0, 1, port + 3, cfg)
    ds_engine = engine.build_engine(torch.nn.Linear(2, 2), cfg, plan, dsconfig.load_ds_config(cfg, plan))
    x, lrs = torch.zeros(1, 2), []
    for _ in range(plan.total_steps):
        lrs.append(ds_engine.get_lr()[0])  # the lr this optimizer step uses
        ds_engine.backward(ds_engine(x).sum())
        ds_engine.step()
    torch.save({"lrs": lrs, "plan": plan}, out_dir / "schedule.pt")


@pytest.mark.slow
def test_golden_8k_schedule_through_the_engine(tmp_path, free_port):
    start_ranks(schedule_main, free_port, tmp_path, ranks=1)
    result = torch.load(tmp_path / "schedule.pt", weights_only=False)
    plan, lrs = result["plan"], result["lrs"]
    assert (plan.global_batch, plan.steps_per_epoch, plan.warmup_steps) == (8192, 156, 780)
    assert len(lrs) == plan.total_steps == 14040
    for epoch, lr in GOLDEN_8K:
        assert lrs[round(epoch * plan.steps_per_epoch)] == pytest.approx(lr), epoch
    assert len(set(lrs[:plan.warmup_steps])) == plan.warmup_steps  # a new lr every warmup iteration


def bf16_main(rank, shard_dir, port, out_dir):
    cfg = config.apply_overrides(small_config(shard_dir), ["train.precision=bf16", "cluster.gpus_per_node=1"])
    ds_engine = start_engine(cfg, 0, 1, port + 1)
    seen = {}

    def record(module, inputs, output):
        seen["conv"] = output.dtype  # returns None: the output itself is left alone

    ds_engine.module.conv1.register_forward_hook(record)
    x, y = batches(cfg, 0, 1)[0]
    ds_engine.backward(torch.nn.functional.cross_entropy(ds_engine(x), y))
    ds_engine.step()
    weights = {t.dtype for t in [*ds_engine.module.parameters(), ds_engine.module.bn1.running_mean]}
    torch.save({"seen": seen, "weights": weights, "steps": ds_engine.global_steps}, out_dir / "bf16.pt")


@pytest.mark.slow
def test_bf16_runs_convolutions_in_bf16_on_fp32_weights(shard_dir, tmp_path, free_port):
    start_ranks(bf16_main, shard_dir, free_port, tmp_path, ranks=1)
    result = torch.load(tmp_path / "bf16.pt")
    assert result["seen"] == {"conv": torch.bfloat16}
    assert result["weights"] == {torch.float32} and result["steps"] == 1  # fp32 weights and BN statistics


def silent_rank_main(rank, port, out):
    """Rank 0 waits in an allreduce that rank 1 never joins; rank 1 waits for rank 0's message, then leaves."""
    import time

    import torch.distributed as dist

    cfg = config.apply_overrides(config.preset("demo"), ["cluster.collective_timeout_s=2"])
    start_rank(rank, 2, port, cfg)
    if rank == 1:
        while not out.exists():
            time.sleep(0.1)
        return
    try:
        with distributed.collectives_explained(cfg.cluster.collective_timeout_s):
            dist.all_reduce(torch.ones(3))
    except RuntimeError as err:
        out.write_text(str(err))
    else:
        out.write_text("the allreduce returned")


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_others_after_the_collective_timeout(tmp_path, free_port):
    out = tmp_path / "message"
    start_ranks(silent_rank_main, free_port, out, ranks=2)
    message = out.read_text()
    assert message.startswith("rank 0: a collective failed (") and "Timed out waiting 2000ms" in message, message
    assert "cluster.collective_timeout_s=2 s" in message and "requeued" in message


def test_the_device_follows_the_backend_and_the_gpus_the_process_sees():
    """gloo stays on the CPU with GPUs present; NCCL takes the local rank's GPU, or the only one where the
    cluster binds one GPU to each task (every task sees cuda:0); more ranks than GPUs is an error naming both."""
    from pipeline.train.distributed import rank_device

    assert rank_device("gloo", 3, 8) == torch.device("cpu")
    assert rank_device("nccl", 3, 8) == torch.device("cuda", 3)
    assert rank_device("nccl", 3, 1, "GPU-5") == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"local rank 3 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES='0,1'\)"):
        rank_device("nccl", 3, 2, "0,1")
    with pytest.raises(RuntimeError, match="needs a GPU, but this process sees none"):
        rank_device("nccl", 0, 0, "")


def test_tf32_is_set_by_the_precision_not_left_to_torchs_defaults():
    """torch's defaults: TF32 in cuDNN's convolutions, not in matmuls. fp32 turns both off (the paper's
    arithmetic), tf32 and bf16 both on; tf32 takes DeepSpeed's fp32 JSON."""
    from pipeline import dsconfig
    from pipeline.train.distributed import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, on in (("fp32", False), ("tf32", True), ("bf16", True)):
            assert set_tf32(precision) == {"matmul": on, "cudnn": on}
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (on, on)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), ["train.precision=tf32"])
    assert dsconfig.ds_config_path(cfg).name == "fp32.json"
    with pytest.raises(ValueError, match="valid: fp32, tf32, bf16"):
        config.resolve(config.apply_overrides(cfg, ["train.precision=fp16"]))
