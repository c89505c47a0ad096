"""Our overlapped bucketed allreduce (pipeline.train.buckets) against DeepSpeed's own stage-0 allreduce, on real
DeepSpeed engines in real processes (gloo)."""

import statistics

import deepspeed
import pytest
import torch
from pipeline.train import buckets
from torch.utils.checkpoint import checkpoint

from helpers import pick_port, start_rank, start_ranks

MICRO = 4
# Bucket sizes in elements: one parameter per bucket, sizes that cut no parameter boundary evenly, one bucket.
SIZES = (1, 37, 500, 10**9)


class Odd(torch.nn.Module):
    """Parameter sizes that divide no bucket size; `sometimes` gets a gradient on rank 1 at odd micro-steps
    and on rank 0 only at every 4th micro-step (with accumulation: never at a boundary), `never` gets
    none, `frozen` needs none. In channels_last, as on GPU: conv weight gradients are not contiguous. Registered first, those two come last in backward
    order, so the buckets before them can start during backward."""

    def __init__(self):
        super().__init__()
        self.sometimes = torch.nn.Linear(13, 11)
        self.never = torch.nn.Linear(13, 3)
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.bn = torch.nn.BatchNorm2d(5)
        self.fc = torch.nn.Linear(5 * 7 * 7, 13)
        self.frozen = torch.nn.Linear(13, 13)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(13, 7)
        self.use_sometimes = False

    def forward(self, x):
        h = self.frozen(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))
        out = self.head(h)
        if self.use_sometimes:
            out = out + self.sometimes(h)[:, :7]
        return out


def make_engine(accum: int, world: int, comm: str, overlap: bool = False, bucket: int = 0, average: bool = True):
    torch.manual_seed(0)
    net = Odd()
    zero = {"stage": 0, "overlap_comm": overlap, **({"reduce_bucket_size": bucket} if bucket else {})}
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
                 "train_batch_size": MICRO * accum * world, "gradient_clipping": 0.0,
                 "zero_optimization": zero, "communication_data_type": comm, "steps_per_print": 10**6}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the weights stay, every mode sees the same
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config, dist_init_required=False)
    engine.gradient_average = average  # False: a sum, so that a second reduction would show
    engine.module.to(memory_format=torch.channels_last)  # after DeepSpeed's start, as engine.build_engine does
    return engine, buckets.attach(engine, ds_config)


def reduced_gradients(engine, reducer, rank: int, accum: int) -> tuple[list[torch.Tensor], list[int]]:
    """The gradients the optimizer sees (recorded by a step pre-hook, after ours) over 2 optimizer steps,
    and how many buckets had started when backward reached the first layer, at each boundary."""
    seen, started = [], []
    handle = engine.optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() if p.grad is not None else None for p in engine.module.parameters()]))
    if reducer:
        engine.module.conv.weight.register_post_accumulate_grad_hook(
            lambda _: started.append(reducer.next) if engine.is_gradient_accumulation_boundary() else None)
    for micro in range(2 * accum):
        gen = torch.Generator().manual_seed(100 * rank + micro)
        x, y = torch.randn(MICRO, 3, 9, 9, generator=gen), torch.randint(0, 7, (MICRO,), generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        engine.module.use_sometimes = (rank == 1 and micro % 2 == 1) or (rank == 0 and micro % 4 == 0)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    handle.remove()
    return [g for step in seen for g in step], started


def rank_main(rank, world, port, out_dir):
    start_rank(rank, world, port)
    results = {}
    for accum in (1, 2):
        for comm in ("fp32", "bf16"):
            engine, _ = make_engine(accum, world, comm)
            results[(accum, comm, "deepspeed")], _ = reduced_gradients(engine, None, rank, accum)
            for size in SIZES if comm == "fp32" else (SIZES[1],):
                engine, reducer = make_engine(accum, world, comm, overlap=True, bucket=size)
                assert reducer is not None and not engine.enable_backward_allreduce
                results[(accum, comm, size)], results[(accum, comm, size, "started")] = reduced_gradients(
                    engine, reducer, rank, accum)
                results[(size, "buckets")] = len(reducer.buckets)
                reducer.remove()
                assert engine.enable_backward_allreduce  # DeepSpeed's own is back
    for mode, overlap in (("deepspeed", False), (SIZES[1], True)):
        engine, _ = make_engine(1, world, "fp32", overlap=overlap, bucket=SIZES[1], average=False)
        results[("sum", mode)], _ = reduced_gradients(engine, None, rank, 1)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def gradients(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"buckets{request.param}")
    start_ranks(rank_main, request.param, pick_port(), out, ranks=request.param)
    return [torch.load(out / f"rank{r}.pt") for r in range(request.param)]


def max_difference(ours: list, theirs: list) -> float:
    assert len(ours) == len(theirs)
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.slow
def test_bucketed_gradients_equal_deepspeeds_own(gradients, accum, size):
    """Same gradients as DeepSpeed's stage 0 on every rank, whatever the bucket size, with accumulation,
    and with parameters that have no gradient on some ranks and steps, or on none."""
    for rank_results in gradients:
        theirs = rank_results[(accum, "fp32", "deepspeed")]
        assert max_difference(rank_results[(accum, "fp32", size)], theirs) <= 1e-6
    # and the reduction happened: every rank holds the same averaged gradients
    assert max_difference(gradients[0][(accum, "fp32", size)], gradients[-1][(accum, "fp32", size)]) == 0


def test_gradients_are_reduced_once(gradients):
    """Summed instead of averaged (engine.gradient_average off), a second reduction would multiply them."""
    for rank_results in gradients:
        assert max_difference(rank_results[("sum", SIZES[1])], rank_results[("sum", "deepspeed")]) <= 1e-6


def test_buckets_start_during_backward(gradients):
    """Overlap: when backward reaches the first layer, the buckets of the later layers are already on the
    wire (at both optimizer steps, with and without accumulation); one huge bucket waits for everything."""
    for rank_results in gradients:
        assert rank_results[(1, "buckets")] == 12  # one per parameter (frozen excluded)
        assert rank_results[(10**9, "buckets")] == 1
        for accum in (1, 2):
            assert min(rank_results[(accum, "fp32", 1, "started")]) >= 6  # head, fc and bn, 2 each
            assert rank_results[(accum, "fp32", 10**9, "started")] == [0, 0]


def bf16_error(ours: list, exact: list) -> float:
    """Worst difference from the fp32 result, in units of the largest gradient magnitude."""
    a, b = (torch.cat([g.flatten() for g in grads if g is not None]) for grads in (ours, exact))
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("accum", [1, 2])
def test_bf16_on_the_wire_like_deepspeeds(gradients, accum):
    """communication_data_type=bf16: our buckets travel in bf16 as DeepSpeed's do: both are off the fp32
    result by bf16 rounding (8 bits of mantissa; gloo's summation order over 3 ranks differs with the
    buffer size, so the two bf16 results need not be identical), and neither is the fp32 result."""
    for rank_results in gradients:
        exact = rank_results[(accum, "fp32", "deepspeed")]
        ours, theirs = rank_results[(accum, "bf16", SIZES[1])], rank_results[(accum, "bf16", "deepspeed")]
        for result in (ours, theirs):
            assert 2**-12 < bf16_error(result, exact) <= 2**-7


def test_configurations_that_would_see_unreduced_gradients_are_refused(tmp_path):
    start_ranks(refusal_main, pick_port(), tmp_path, ranks=1)
    assert (tmp_path / "refused").read_text().startswith("overlap_comm at stage 0 reduces the gradients")


def refusal_main(rank, port, out_dir):
    start_rank(0, 1, port)
    net = Odd()
    ds_config = {"train_batch_size": MICRO, "gradient_clipping": 1.0, "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 0, "overlap_comm": True}}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                           config=ds_config, dist_init_required=False)
    with pytest.raises(ValueError) as err:
        buckets.attach(engine, ds_config)
    (out_dir / "refused").write_text(str(err.value))


def test_engine_in_channels_last_starts_on_several_ranks(tmp_path):
    """GPU runs train channels_last: build_engine converts after DeepSpeed's start, whose broadcast of the
    initial weights refuses channels_last conv weights; then one step reduces through the buckets."""
    start_ranks(channels_last_main, pick_port(), tmp_path, ranks=2)
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert max_difference(grads[0], grads[1]) == 0


def demo_engine(rank: int, port: int, overrides: list[str], channels_last: bool = False):
    """Rank `rank` of the demo's 2 ranks, started as pipeline.train.loop starts one; its engine and config."""
    from pipeline import config, dsconfig
    from pipeline.train import engine, model

    cfg = config.apply_overrides(config.preset("demo"), overrides)
    plan = config.resolve(cfg)
    start_rank(rank, 2, port, cfg)
    torch.manual_seed(0)
    ds_engine = engine.build_engine(model.build(cfg.model), cfg, plan, dsconfig.load_ds_config(cfg, plan),
                                    channels_last=channels_last)
    return ds_engine, cfg


def channels_last_main(rank, port, out_dir):
    ds_engine, _ = demo_engine(rank, port, ["train.micro_batch=4"], channels_last=True)
    assert ds_engine.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert ds_engine.bucketed_allreduce is not None and not ds_engine.enable_backward_allreduce  # ours reduces
    seen = []
    ds_engine.optimizer.register_step_pre_hook(lambda *_: seen.extend(p.grad.clone() for p in ds_engine.parameters()))
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(rank)).contiguous(
        memory_format=torch.channels_last)
    ds_engine.backward(torch.nn.functional.cross_entropy(ds_engine(x), torch.tensor([0, 1, 2, 3])))
    ds_engine.step()
    torch.save(seen, out_dir / f"rank{rank}.pt")


def test_misuse_is_refused_naming_the_parameter_and_no_sync_is_honoured(tmp_path):
    """What would otherwise be lost silently raises an error that names the parameter; a reset() after
    one lets training go on; engine.no_sync() defers the reduction as DeepSpeed's own does."""
    start_ranks(misuse_main, pick_port(), tmp_path, ranks=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert max_difference(res["no_sync", "ours"], res["no_sync", "deepspeed"]) <= 1e-6
        assert "the gradient of head.bias was accumulated twice" in res["second backward"]
        assert max_difference(res["after reset"], res["no_sync", "deepspeed"][:len(res["after reset"])]) <= 1e-6
        assert "changed between engine.backward() and engine.step()" in res["edited"]
        assert "head.weight" in res["edited"] and "conv.weight" not in res["edited"]  # conv's bucket starts last
        assert "requires_grad of frozen.bias, frozen.weight, head.bias changed" in res["requires_grad"]
        assert "was accumulated twice" in res["reentrant"] and "use_reentrant=False" in res["reentrant"]
        assert "of head." in res["reentrant"]
    assert max_difference(results[0]["no_sync", "ours"], results[1]["no_sync", "ours"]) == 0


def misuse_main(rank, port, out_dir):
    start_rank(rank, 2, port)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(MICRO, 3, 9, 9, generator=gen), torch.randint(0, 7, (MICRO,), generator=gen))
               for _ in range(2)]

    def loss(engine, i):
        return torch.nn.functional.cross_entropy(engine(batches[i][0]), batches[i][1])

    def grads(engine):
        return [p.grad.clone() for p in engine.module.parameters() if p.grad is not None]

    results = {}
    for mode, overlap in (("deepspeed", False), ("ours", True)):
        engine, _ = make_engine(1, 2, "fp32", overlap=overlap, bucket=37)
        seen = []
        engine.optimizer.register_step_pre_hook(lambda *_: seen.extend(grads(engine)))
        with engine.no_sync():
            engine.backward(loss(engine, 0))
        engine.backward(loss(engine, 1))
        engine.step()
        results["no_sync", mode] = seen

    engine, reducer = make_engine(1, 2, "fp32", overlap=True, bucket=37)
    assert engine.bucketed_allreduce is reducer
    engine.backward(loss(engine, 0))
    with pytest.raises(RuntimeError) as err:
        engine.backward(loss(engine, 1))
    results["second backward"] = str(err.value)
    reducer.reset()
    engine.zero_grad()
    seen = []
    engine.optimizer.register_step_pre_hook(lambda *_: seen.extend(grads(engine)))
    with engine.no_sync():
        engine.backward(loss(engine, 0))
    engine.backward(loss(engine, 1))
    engine.step()
    results["after reset"] = seen

    engine, _ = make_engine(1, 2, "fp32", overlap=True, bucket=37)
    engine.backward(loss(engine, 0))
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.mul_(0.5)  # clipping by hand, too late
    with pytest.raises(RuntimeError) as err:
        engine.step()
    results["edited"] = str(err.value)

    engine, _ = make_engine(1, 2, "fp32", overlap=True, bucket=37)
    engine.module.frozen.requires_grad_(True)
    engine.module.head.bias.requires_grad_(False)
    engine.backward(loss(engine, 0))
    with pytest.raises(RuntimeError) as err:
        engine.step()
    results["requires_grad"] = str(err.value)

    # One bucket: none can start before the error, whichever of head's hooks comes first on each rank (their
    # order varies), so no rank is left with an allreduce its peer never joins.
    engine, reducer = make_engine(1, 2, "fp32", overlap=True, bucket=SIZES[-1])
    z = torch.randn(MICRO, 13, generator=gen, requires_grad=True)
    # head in two reentrant checkpoint segments: each segment's own backward accumulates into head's grads
    twice = sum(checkpoint(engine.module.head, z, use_reentrant=True).sum() for _ in range(2))
    with pytest.raises(RuntimeError) as err:
        engine.backward(loss(engine, 0) + twice)
    results["reentrant"] = str(err.value)
    reducer.reset()
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
def test_a_cpu_rank_reuses_freed_memory_from_step_to_step(tmp_path):
    """Our buckets keep their buffers, so glibc's thresholds never rise as they do when DeepSpeed frees
    its flat gradient copy each step: without distributed.keep_freed_memory, a demo step returned its
    activations to the kernel and faulted them back in (~4,600 page faults, ~10% of the step)."""
    start_ranks(faults_main, pick_port(), tmp_path, ranks=2)
    for rank in range(2):
        faults = torch.load(tmp_path / f"faults{rank}.pt")
        # Without it: ~4,600 in every step. With it: 0-2, and now and then one step that grows the heap once
        # (~2,300-2,800), so the median over 8 steps counts, not the worst step.
        assert statistics.median(faults) < 100, faults


def faults_main(rank, port, out_dir):
    import resource

    ds_engine, cfg = demo_engine(rank, port, [])
    assert ds_engine.bucketed_allreduce is not None
    gen = torch.Generator().manual_seed(rank)
    side = cfg.data.image_size
    faults = []
    for _ in range(12):
        x = torch.randn(cfg.train.micro_batch, 3, side, side, generator=gen)
        y = torch.randint(0, cfg.model.num_classes, (cfg.train.micro_batch,), generator=gen)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ds_engine.backward(torch.nn.functional.cross_entropy(ds_engine(x), y))
        ds_engine.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    torch.save(faults[4:], out_dir / f"faults{rank}.pt")


def test_a_channels_last_gradient_goes_into_its_bucket_in_its_own_memory_order():
    """The slot of a channels_last conv weight's gradient is viewed with the gradient's strides: the copy is a
    plain memory copy (the buffer holds the NHWC order), not a transpose into an NCHW view; a contiguous
    gradient keeps the plain view."""
    grad = torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    buffer = torch.zeros(7 + grad.numel())
    slot = buckets._slot(buffer, 7, grad)
    assert slot.stride() == grad.stride()
    slot.copy_(grad)
    assert torch.equal(buffer[7:], grad.permute(0, 2, 3, 1).flatten())
    plain = torch.randn(4, 3)
    assert buckets._slot(torch.zeros(12), 0, plain).stride() == plain.stride()
