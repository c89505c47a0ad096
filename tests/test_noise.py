"""The gradient noise scale (pipeline.train.noise) through real DeepSpeed engines and our buckets, on least
squares, whose per-sample gradients are known in closed form: the estimate against tr(Sigma) / |G|^2
computed from every sample's gradient."""

import deepspeed
import pytest
import torch
import torch.distributed as dist
from pipeline.train import buckets, noise

from helpers import pick_port, start_rank, start_ranks

SAMPLES, DIM, MICRO, STEPS = 4096, 8, 8, 1500


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian inputs, targets from a linear model plus noise, and weights off the optimum."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, DIM, generator=gen, dtype=torch.float64)
    truth = torch.randn(DIM, generator=gen, dtype=torch.float64)
    y = x @ truth + 0.5 * torch.randn(SAMPLES, generator=gen, dtype=torch.float64)
    return x, y, truth + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64)


def exact_noise_scale() -> float:
    """tr(Sigma) / |G|^2 from every sample's gradient of (x.w - y)^2, 2 x (x.w - y), at the weights w."""
    x, y, w = problem()
    per_sample = 2 * x * (x @ w - y)[:, None]
    mean = per_sample.mean(0)
    trace = ((per_sample - mean) ** 2).sum(1).mean()  # the population covariance: batches draw with replacement
    return float(trace / mean.square().sum())


def measure(rank: int, world: int, accum: int) -> dict:
    """STEPS optimizer steps at lr 0 (the weights stay where the exact value is computed) of batches drawn
    with replacement: the window estimates summed over ranks, as a train_iter record takes them."""
    x, y, w = problem()
    net = torch.nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(w.float()[None])
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
                 "train_batch_size": MICRO * accum * world, "gradient_clipping": 0.0, "steps_per_print": 10**6,
                 "zero_optimization": {"stage": 0, "overlap_comm": True}}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                           config=ds_config, dist_init_required=False)
    meter = buckets.attach(engine, ds_config).measure_noise(noise.pairing(world, MICRO, accum))
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        # The step's kn samples, the same for every shape: rank r takes micro-batches r*accum .. r*accum+accum-1
        picks = torch.randint(0, SAMPLES, (world * accum, MICRO), generator=gen)
        for micro in range(accum):
            batch = picks[rank * accum + micro]
            loss = torch.nn.functional.mse_loss(engine(x[batch].float())[:, 0], y[batch].float())
            engine.backward(loss)
            engine.step()
    sums = meter.take()
    dist.all_reduce(sums)  # as the record's window: sums over ranks
    return {**meter.fields(sums.tolist()), "pair": meter.pair}


def rank_main(rank: int, world: int, accum: int, port: int, out) -> None:
    start_rank(rank, world, port)
    result = measure(rank, world, accum)
    if rank == 0:
        torch.save(result, out)


def run(tmp_path, world: int, accum: int) -> dict:
    out = tmp_path / f"noise-{world}x{accum}.pt"
    start_ranks(rank_main, world, accum, pick_port(), out, ranks=world)
    return torch.load(out, weights_only=False)


def test_the_estimates_are_unbiased_on_expected_norms():
    """Fed E|G_B|^2 = |G|^2 + tr(Sigma)/B at two batch sizes, the estimates return |G|^2 and tr(Sigma)."""
    g2, trace = 0.7, 45.0
    got = noise.estimates(g2 + trace / 8, g2 + trace / 32, 8, 32)
    assert got == pytest.approx((g2, trace))
    assert noise.ratio(trace, g2) == pytest.approx(trace / g2)
    assert noise.ratio(trace, -0.1) is None


@pytest.mark.slow
def test_the_noise_scale_of_least_squares_is_within_ten_percent_of_the_exact_one_and_shapes_agree(tmp_path):
    """2 ranks x accumulation 1 (each rank's gradient before the allreduce against the average after it),
    1 rank x accumulation 2 (each micro-batch's gradient against their mean) on the same samples: the same
    estimate, within 10 % of tr(Sigma)/|G|^2 from all 4,096 per-sample gradients; and one rank, one
    micro-batch a step (consecutive steps, exact at lr 0) within 10 % too."""
    exact = exact_noise_scale()
    ranks, micro, steps = run(tmp_path, 2, 1), run(tmp_path, 1, 2), run(tmp_path, 1, 1)
    assert (ranks["pair"].kind, ranks["pair"].b_small, ranks["pair"].b_big) == ("ranks", 8, 16)
    assert (micro["pair"].kind, micro["pair"].b_small, micro["pair"].b_big) == ("micro-batches", 8, 16)
    assert steps["pair"].kind == "consecutive steps"
    assert micro["noise_g2"] == pytest.approx(ranks["noise_g2"], rel=1e-6)
    assert micro["noise_trace"] == pytest.approx(ranks["noise_trace"], rel=1e-6)
    for result in (ranks, micro, steps):
        assert noise.ratio(result["noise_trace"], result["noise_g2"]) == pytest.approx(exact, rel=0.1)
        assert result["noise_scale"] == pytest.approx(exact, rel=0.1)  # one window: the smoothed pair is its own


def test_the_noise_scale_over_training_is_the_ratio_of_each_thirds_means():
    iters = [{"noise_g2": g2, "noise_trace": 10.0, "noise_pairing": "ranks (8 and 16 images)"}
             for g2 in (1.0, 1.0, 0.5, 0.5, 0.25, 0.25)]
    assert noise.over_training(iters) == {"early": 10.0, "middle": 20.0, "late": 40.0,
                                          "pairing": "ranks (8 and 16 images)"}
    assert noise.over_training(iters[:2]) is None


def test_where_deepspeeds_allreduce_runs_the_record_says_it_is_not_measured():
    """Never a silent zero: no noise scale, the reason in the record, and a progress line without the value."""
    from pipeline.train import metrics

    fields = noise.not_measured()
    assert fields["noise_scale"] is None and fields["noise_pairing"].startswith("not measured: DeepSpeed's own")
    line = metrics.progress_line({"_type": "train_iter", "step": 1, "total_steps": 2, "epoch": 0, "lr": 0.1, "loss": 2.0,
                                  "img_s": 10.0, **fields})
    assert "noise scale" not in line
