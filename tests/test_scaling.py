"""The scaling model (pipeline.scaling) against its formulas and against the paper's cluster."""

import dataclasses
import json
import math

import pytest
from pipeline.scaling import model as scaling
from pipeline.scaling.__main__ import main as scaling_main

R50 = 25_557_032  # ResNet-50's gradient elements: ~100 MB in fp32 (paper 4)


def test_ring_and_halving_doubling_move_the_same_bytes_in_different_steps():
    """Paper 4: halving/doubling takes 2 log2 p latency steps, the ring 2 (p - 1); both move 2 (p-1)/p b."""
    latency_only = dataclasses.replace(scaling.PAPER, inter=scaling.Link(1e-3, 1e30))
    bytes_only = dataclasses.replace(scaling.PAPER, inter=scaling.Link(0.0, 1e9))
    one_gpu = 1  # no phase inside the server
    assert scaling.allreduce_s(1e8, 32, one_gpu, latency_only, "halving_doubling") == pytest.approx(2 * 5 * 1e-3)
    assert scaling.allreduce_s(1e8, 32, one_gpu, latency_only, "ring") == pytest.approx(2 * 31 * 1e-3)
    for algorithm in scaling.ALGORITHMS:
        assert scaling.allreduce_s(1e8, 32, one_gpu, bytes_only, algorithm) == pytest.approx(2 * 31 / 32 * 0.1)
    # three phases: a reduce and a broadcast inside the server come on top
    inside = 2 * 7 * 10e-6 + 2 * 7 / 8 * 1e8 / 20e9
    assert scaling.allreduce_s(1e8, 1, 8, scaling.PAPER, "ring") == pytest.approx(inside)


def test_buckets_hide_communication_behind_backward():
    def wire(nbytes):
        return 1e-3 + nbytes / 1e9  # 1 ms per message, 1 GB/s

    grad = 100e6
    one = scaling.exposed_s(grad, None, 0.120, wire)
    assert one == pytest.approx(0.101)  # everything after backward
    # 4 buckets of 25 MB, ready every 30 ms, 26 ms each on the wire: only the last one shows
    assert scaling.exposed_s(grad, 25e6, 0.120, wire) == pytest.approx(0.026)
    # a wire slower than backward: the queue shows
    assert scaling.exposed_s(grad, 25e6, 0.040, wire) == pytest.approx(0.010 + 4 * 0.026 - 0.040)
    # 100 MB in buckets of 60: the first is ready at 60% of backward, not half-way; the 40 MB left at the end
    assert scaling.exposed_s(grad, 60e6, 0.120, wire) == pytest.approx(0.072 + 0.061 - 0.120 + 0.041)
    # tiny buckets pay the latency of every message
    assert scaling.exposed_s(grad, 1e5, 0.120, wire) > scaling.exposed_s(grad, 25e6, 0.120, wire)


def test_the_paper_cluster_steps_and_scales_like_the_paper():
    """8 P100s step in ~0.232 s (90 epochs in 29 h); 256 over 50 Gbit in at most 0.256 s (90 epochs in
    1 h, evaluation included) at ~90% scaling efficiency (paper 5.5); overlap is what keeps it there."""
    base = scaling.predict(scaling.PAPER, R50, 1, 8, 32, 6_553_600)
    big = scaling.predict(scaling.PAPER, R50, 32, 8, 32, 6_553_600)
    serial = scaling.predict(scaling.PAPER, R50, 32, 8, 32, None)
    assert base.step_s == pytest.approx(0.232, rel=0.03)
    assert base.step_s < big.step_s <= 0.256
    assert 0.88 <= scaling.efficiency(big, base) <= 0.99
    assert scaling.efficiency(serial, scaling.predict(scaling.PAPER, R50, 1, 8, 32, None)) < scaling.efficiency(big, base)
    assert big.images_s == pytest.approx(256 * 32 / big.step_s)


def test_accumulation_repeats_compute_but_not_communication():
    one = scaling.predict(scaling.PAPER, R50, 4, 8, 32, 6_553_600)
    two = scaling.predict(scaling.PAPER, R50, 4, 8, 32, 6_553_600, grad_accum=2)
    hw = scaling.PAPER
    assert two.step_s - one.step_s == pytest.approx(hw.forward_s + hw.backward_s)
    assert two.communication_s == one.communication_s


def test_fit_link_recovers_latency_and_bandwidth():
    truth = scaling.Link(50e-6, 2e9)
    samples = [(steps, nbytes, steps * truth.latency_s + nbytes / truth.bandwidth_Bps)
               for steps in (2, 4) for nbytes in (1e4, 1e6, 1e8)]
    fitted = scaling.fit_link(samples)
    assert fitted.latency_s == pytest.approx(truth.latency_s, rel=1e-6)
    assert fitted.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=1e-6)
    with pytest.raises(ValueError, match="do not grow with their size"):
        scaling.fit_link([(2, 1e4, 1.0), (2, 1e8, 0.5)])


def test_hardware_files_round_trip_and_say_what_is_missing(tmp_path):
    one_node = dataclasses.replace(scaling.PAPER, name="mine", inter=None)
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps(dataclasses.asdict(one_node)))
    assert scaling.load_hardware(str(path)) == one_node
    assert scaling.predict(one_node, R50, 1, 8, 32, None).step_s > 0
    with pytest.raises(ValueError, match="no inter-node measurement.*2 or more nodes"):
        scaling.predict(one_node, R50, 2, 8, 32, None)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        scaling.load_hardware(str(tmp_path / "none.json"))
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a hardware profile"):
        scaling.load_hardware(str(path))
    path.write_text("{")
    with pytest.raises(ValueError, match="hardware.json: not a hardware profile"):
        scaling.load_hardware(str(path))
    path.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(one_node, intra=scaling.Link(1e-5, 0.0)))))
    with pytest.raises(ValueError, match="out of range"):
        scaling.load_hardware(str(path))


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0,2"], "--nodes: 0 is not a whole number"),
    (["--nodes", "four"], "--nodes 'four': give node counts"),
    (["--micro-batch", "-1"], "--micro-batch: -1"),
    (["--micro-batch", "0"], "--micro-batch: 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node: 0"),
    (["--bucket", "-5"], "--bucket -5"),
])
def test_cli_refuses_bad_numbers(flags, message, capsys):
    assert scaling_main(flags) == 2
    assert message in capsys.readouterr().err


def test_cli_table(capsys):
    assert scaling_main(["--nodes", "1,32"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1].split()
    assert last[:2] == ["32", "256"] and math.isclose(float(last[-1].rstrip("%")), 96.7, abs_tol=0.1)
