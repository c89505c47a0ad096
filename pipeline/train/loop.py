"""What every rank runs: stream its part of the shards through the DeepSpeed engine, evaluate, checkpoint.

All state lives in the run folder (config.json, ds_config.json, metrics.jsonl, checkpoints/), so the job
(pipeline.launch.jobs.TrainJob) is just that folder's path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Config, Plan, load_run_config, to_dict
from pipeline.data.decode import Encoded, decode_on_device, normalize
from pipeline.data.manifest import load_manifest
from pipeline.data.streams import Batch, EvalStream, train_stream
from pipeline.data.workers import loader
from pipeline.train import checkpoint, metrics, model, noise, preempt, report, tags
from pipeline.train.distributed import average_bn_statistics, collectives_explained, init_distributed, is_primary
from pipeline.train.engine import build_engine
from pipeline.train.schedule import lr_at


def model_input(images: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """uint8 batch (a channels_last view) -> normalised fp32 input on the device, in the model's memory
    format: channels_last on GPU, contiguous NCHW on CPU.

    Under bf16, DeepSpeed's torch_autocast casts inside the forward; the input stays fp32.
    """
    x = normalize(images.to(device, non_blocking=True), cfg.data)
    return x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)


def on_device(batch: Batch, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A training batch's uint8 images (decoded here, on the device, under data.decode=gpu; else as the loader
    made them), its labels on the device, and how many of its images did not decode here: each is named on
    stderr and replaced by another image of the batch, its label with it (pipeline.data.decode)."""
    images, labels = batch.images, batch.labels
    if not isinstance(images, Encoded):
        return images, labels.to(device, non_blocking=True), 0

    def warn(index: int, err: Exception) -> None:
        print(f"warning: sample {batch.keys[index]!r} is not a decodable image ({err}); replaced by another sample "
              "of its batch", file=sys.stderr, flush=True)

    images, sources = decode_on_device(images, cfg.data, device, warn)
    replaced = sum(source != i for i, source in enumerate(sources))
    return images, (labels[sources] if replaced else labels).to(device, non_blocking=True), replaced


def forward(net, images: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """fp32 logits of a uint8 batch. Under train.precision=bf16, DeepSpeed's autocast ends with the model's
    forward, so the logits come out in bf16: the loss's log-softmax and the top-k counts use their fp32 copy
    (inside autocast, cross_entropy would have run in fp32 too)."""
    return net(model_input(images, cfg, device)).float()


def training_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The mean cross-entropy of the micro-batch against labels smoothed by train.label_smoothing = s: the
    target is 1 - s + s/C on the label and s/C on each of the other C - 1 classes (torch's definition)."""
    return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.train.label_smoothing)


@torch.no_grad()
def precise_bn(net: torch.nn.Module, batches, count: int, cfg: Config, device: torch.device) -> None:
    """Replace BN running statistics with their plain average over `count` training batches ("precise
    BN", pycls's compute_precise_bn_stats), instead of the exponential running averages; evaluate() then
    averages them over ranks like the running ones. The forwards run in training mode under the training's
    precision (bf16 autocast where it trains so). With momentum 1 each forward leaves its batch's statistics,
    which are summed on the device: torch's update_bn instead runs BN's cumulative average, which reads
    num_batches_tracked on the host for every BN layer and batch (a sync each on a GPU)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    momenta, training = [bn.momentum for bn in bns], net.training
    for bn in bns:
        bn.momentum = 1.0  # the running statistics become the batch's
    net.train()
    bf16 = cfg.train.precision == "bf16"
    seen = 0
    for batch in itertools.islice(batches, count):
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            net(model_input(on_device(batch, cfg, device)[0], cfg, device))
        for bn, mean, var in zip(bns, means, variances):
            mean += bn.running_mean
            var += bn.running_var
        seen += 1
    for bn, mean, var, momentum in zip(bns, means, variances, momenta):
        bn.running_mean.copy_(mean / seen)
        bn.running_var.copy_(var / seen)
        bn.momentum = momentum
    net.train(training)


def hit_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits, images] of a batch, float64 on the logits' device, without a host sync.

    Every operand is made on that device (new_full launches a fill there, it copies nothing from the host):
    torch.tensor(len(labels)) would be on the CPU, and torch.stack refuses to mix devices, which killed every
    GPU run at the end of its first epoch."""
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = topk == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), labels.new_full((), labels.shape[0])]).double()


def window_sums(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss, top-1 hits, top-5 hits, images] of a micro-batch, float64 on the logits' device: what a
    train_iter record sums over its window, without a host sync."""
    return torch.cat([loss.detach().double().view(1), hit_counts(logits.detach(), labels)])


@torch.no_grad()
def evaluate(engine, cfg: Config, batches, num_samples: int, device: torch.device) -> dict:
    """Top-1/top-5 error on the whole validation split, each image counted once across ranks."""
    engine.eval()
    average_bn_statistics(engine.module)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct, images
    for batch in batches:
        labels = batch.labels.to(device, non_blocking=True)
        counts += hit_counts(forward(engine, batch.images, cfg, device), labels)
    dist.all_reduce(counts)  # all_reduce: per-rank counts -> global counts
    top1, top5, seen = counts.tolist()
    if int(seen) != num_samples:
        raise RuntimeError(f"evaluated {int(seen)} images but the val manifest lists {num_samples}")
    return {"top1_err": 100 * (1 - top1 / seen), "top5_err": 100 * (1 - top5 / seen), "num_samples": int(seen)}


class Stopped(RuntimeError):
    """A signal stopped the run; its checkpoint is complete but the job was not requeued."""


class Diverged(RuntimeError):
    """A loss was not finite: the run stopped, wrote no checkpoint of its diverged weights, and is not
    requeued."""


class Trainer:
    """A rank's training, its state held once: the DeepSpeed engine, the config and its plan, the device,
    the metrics log, the stop request, and the run folder it checkpoints into (None: no checkpoint, as where
    a test steps an engine by itself)."""

    def __init__(self, engine, cfg: Config, plan: Plan, device: torch.device, log: metrics.MetricsLog,
                 stop: preempt.StopRequest, run_dir: Path | None = None, max_requeues: int = 0):
        self.engine, self.cfg, self.plan, self.device, self.log, self.stop = engine, cfg, plan, device, log, stop
        self.run_dir, self.max_requeues = run_dir, max_requeues
        self.config_dict = to_dict(cfg)

    def save(self, tag: str) -> str:
        """Checkpoint with the loader position the global step implies: a stop never falls on an epoch's
        last step, so a mid-epoch step resumes in its epoch and an epoch's end at the next one's start."""
        epoch, step_in_epoch = divmod(self.engine.global_steps, self.plan.steps_per_epoch)
        try:
            return checkpoint.save(self.engine, self.run_dir, tag, {"epoch": epoch, "step_in_epoch": step_in_epoch},
                                   self.config_dict, self.cfg.train.keep_checkpoints)
        except checkpoint.SaveFailed as err:  # the record keeps pipeline.requeue from requeueing into the same disk
            self.log.write("save_failed", step=self.engine.global_steps, tag=tag, message=str(err))
            raise

    def train_epoch(self, batches, epoch: int) -> tuple[int, bool]:
        """The rest of an epoch (the loader starts where set_epoch put it), grad_accum micro-batches per
        optimizer step. Returns the corrupt samples replaced on all ranks, and whether the ranks agreed to
        stop (a signal, or a loss that was not finite: stop.diverged_at) before the epoch's end; the last step
        of an epoch never stops here, so that the epoch's evaluation and checkpoint still happen. With a run
        folder, it writes the periodic checkpoints (train.checkpoint_every_min) when stop.clock says the ranks
        agreed on one."""
        engine, cfg, plan, device, log, stop = self.engine, self.cfg, self.plan, self.device, self.log, self.stop
        engine.train()
        corrupt, stopped = 0, False
        last_step = (epoch + 1) * plan.steps_per_epoch
        # The window's sums since the last record, on the device (no host sync per step): [loss of each
        # micro-batch, top-1 hits, top-5 hits, images]
        window, window_n, window_start = torch.zeros(4, dtype=torch.float64, device=device), 0, time.time()
        waited = 0.0  # seconds of the window this rank spent waiting for its next batch
        batches = iter(batches)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            images, labels, replaced = on_device(batch, cfg, device)
            corrupt += batch.corrupt + replaced
            # Mean over this rank's n; DeepSpeed averages gradients over ranks: together 1/(kn) (remark 3).
            logits = forward(engine, images, cfg, device)
            loss = training_loss(logits, labels, cfg)
            # all_reduce of gradients at the accumulation boundary: started during backward and awaited before the
            # optimizer step (pipeline.train.buckets), or after backward (DeepSpeed's own, overlap_comm=false)
            engine.backward(loss)
            stop.note_loss(loss)  # on the device: read with the stop flags, one step late
            lr = engine.get_lr()[0]
            before = engine.global_steps
            engine.step()
            window += window_sums(loss, logits, labels)
            window_n += 1
            step = engine.global_steps
            if step == before:  # inside an accumulation window: no optimizer step yet
                continue
            if step % cfg.train.log_every == 0 or step == plan.total_steps:
                meter = engine.bucketed_allreduce.meter if engine.bucketed_allreduce else None
                sums = torch.cat([window, meter.take()]) if meter else window
                dist.all_reduce(sums)  # all_reduce: every rank's window sums -> global sums (once per record)
                values = sums.tolist()
                loss_sum, top1, _, seen = values[:4]
                elapsed = time.time() - window_start
                # train_err: top-1 error of the window's training images, each counted when it was trained on (in
                # training mode, before its step's update: Fig. 2 of the paper plots this). data_wait: rank 0's
                # share of the window's wall time spent waiting for its loader (a slower loader on another rank
                # shows here as slower steps, spent in the allreduce, not as waiting)
                log.write("train_iter", step=step, epoch=epoch, lr=lr, loss=loss_sum / (window_n * plan.world_size),
                          train_err=100 * (1 - top1 / seen), img_s=seen / elapsed, total_steps=plan.total_steps,
                          data_wait=min(1.0, waited / elapsed),
                          **(meter.fields(values[4:]) if meter else noise.not_measured()))
                window, window_n, window_start, waited = torch.zeros_like(window), 0, time.time(), 0.0
            if step < last_step and stop.poll(device, step):
                stopped = True
                break
            if self.run_dir is not None and stop.clock.due and step < last_step and stop.diverged_at is None:
                log.write("checkpoint", step=step, tag=self.save(f"step-{step:07d}"), reason="periodic")
                stop.clock.saved()
        total = torch.tensor(corrupt, dtype=torch.int64, device=device)
        dist.all_reduce(total)  # all_reduce: per-rank corrupt counts -> global count
        return int(total), stopped

    def end_after_divergence(self) -> None:
        """Log the divergence and end every rank with Diverged, naming the step, its lr and the newest good
        checkpoint."""
        engine, cfg, plan, stop, log = self.engine, self.cfg, self.plan, self.stop, self.log
        step = stop.diverged_at or engine.global_steps
        lr = lr_at(step - 1, cfg.optim.base_lr, plan, cfg.schedule)
        good = tags.latest_tag(self.run_dir)
        log.announce("diverged", step=step, lr=lr, checkpoint=good)
        raise Diverged(f"the loss was not finite (nan or inf) by step {step}, at lr {lr:g}: the run diverged and was "
                       f"stopped; {f'checkpoint {good} is the newest good one' if good else 'it has no checkpoint'}. "
                       "Lower optim.base_lr or lengthen schedule.warmup_epochs, and start a new run folder")

    def end_after_stop(self, tag: str) -> None:
        """After the checkpoint of a stop: rank 0 requeues the job, every rank learns whether it did, the
        stop is logged, and the rank ends: SystemExit when requeued (the job comes back and resumes),
        Stopped otherwise (the message says how to resume)."""
        engine, stop, log = self.engine, self.stop, self.log
        requeued, message = stop.requeue(self.max_requeues) if is_primary() else (False, "")
        flag = torch.tensor([requeued], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag)  # all_reduce: rank 0's outcome -> every rank
        log.announce("stop", signal=stop.received, step=engine.global_steps, checkpoint=tag,
                     requeued=bool(flag.item()), message=message)
        if flag.item():
            raise SystemExit(-1)  # no result is recorded: the requeued job finishes the run
        raise Stopped(f"stopped after step {engine.global_steps} ({stop.received or 'a signal on another rank'}); "
                      f"checkpoint {tag} is complete; {message}; run the same command again to resume from it")


def run(run_dir: Path, stop: preempt.StopRequest | None = None, max_requeues: int = 0) -> dict:
    """Train the run in run_dir from its newest checkpoint to the end; returns the last eval record.

    `stop` catches SIGUSR2/SIGTERM (entry points install it first thing, so that no signal is missed
    during start-up); on one, every rank checkpoints after the same step and the job is requeued
    (`max_requeues` limits requeues of a plain srun job; submitit keeps its own count).
    """
    stop = stop or preempt.StopRequest().install()
    run_dir = Path(run_dir)
    cfg, plan = load_run_config(run_dir)
    device = init_distributed(cfg)
    with collectives_explained(cfg.cluster.collective_timeout_s):
        return train(run_dir, cfg, plan, device, stop, max_requeues)


def train(run_dir: Path, cfg: Config, plan: Plan, device: torch.device, stop: preempt.StopRequest,
          max_requeues: int) -> dict:
    """run() once torch.distributed is up."""
    log = metrics.MetricsLog(run_dir / "metrics.jsonl", enabled=is_primary())
    train_manifest = load_manifest(cfg.data.shards, "train")
    val_manifest = load_manifest(cfg.data.shards, "val")
    for manifest, planned in ((train_manifest, cfg.data.train_samples), (val_manifest, cfg.data.val_samples)):
        if manifest.num_samples != planned:  # the plan (steps, warmup) was derived from the config's count
            raise ValueError(f"{manifest.path} now lists {manifest.num_samples} samples but the run was planned for "
                             f"{planned}; the shards changed after submission: restore them or start a new run")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = model.build(cfg.model).to(device)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    engine = build_engine(net, cfg, plan, ds_config, channels_last=device.type == "cuda")
    trainer = Trainer(engine, cfg, plan, device, log, stop, run_dir, max_requeues)
    stop.clock = checkpoint.Clock(cfg.train.checkpoint_every_min * 60)
    resumed = checkpoint.resume(engine, run_dir, trainer.config_dict)
    epoch, step_in_epoch, skipped = 0, 0, []
    if resumed:
        tag, position, ranks_before, skipped = resumed
        epoch, step_in_epoch = position["epoch"], position["step_in_epoch"]
    log.add_tensorboard(purge_step=engine.global_steps)
    log.write("start", world_size=plan.world_size, global_batch=plan.global_batch, plan=plan.summary(cfg),
              device=str(device), tf32=torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
              job_id=os.environ.get("SLURM_JOB_ID"), restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    if resumed:
        # After a crash, the steps since the checkpoint are trained and logged again: the resume record names
        # the steps whose earlier records this attempt supersedes (reports keep the last record of a step).
        iters = [r for r in metrics.read(log.path) if r["_type"] == "train_iter"] if is_primary() else []
        redone = [r["step"] for r in iters if r["step"] > engine.global_steps]
        if engine.bucketed_allreduce and engine.bucketed_allreduce.meter:  # the noise scale's smoothing goes on
            engine.bucketed_allreduce.meter.restore(next((r for r in reversed(iters)
                                                          if r["step"] <= engine.global_steps), None))
        log.announce("resume", checkpoint=tag, epoch=epoch, step=engine.global_steps, ranks=plan.world_size,
                     skipped=skipped, ranks_before=ranks_before,
                     superseded_steps=[engine.global_steps + 1, max(redone)] if redone else None)
    rank, world, pin = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    stream = train_stream(train_manifest, cfg.data, cfg.train.micro_batch, plan.steps_per_epoch * cfg.train.grad_accum,
                          rank, world, cfg.train.grad_accum, cfg.train.seed)
    train_batches = loader(stream, cfg.data, pin)
    val_stream = EvalStream(val_manifest, cfg.data, cfg.train.micro_batch, rank, world)
    val_batches = loader(val_stream, cfg.data, pin, persistent=False)
    result = {}
    started = time.time()
    first_epoch = epoch
    while epoch < cfg.schedule.epochs:
        epoch_start = time.time()
        stream.set_epoch(epoch, step_in_epoch * cfg.train.grad_accum)
        corrupt, stopped = trainer.train_epoch(train_batches, epoch)
        if not stopped:
            stop.settle(device, engine.global_steps)  # the epoch's last losses, before evaluating and saving
        if stop.diverged_at is not None:
            trainer.end_after_divergence()
        if stopped:
            trainer.end_after_stop(trainer.save(f"step-{engine.global_steps:07d}"))
        # Compiled for training's full batches in training mode: evaluation's mode, its short last batch and
        # precise BN run eagerly instead of compiling the model again for each
        with torch.compiler.set_stance("force_eager") if cfg.train.compile else contextlib.nullcontext():
            if cfg.train.precise_bn_batches:
                stream.set_epoch(epoch)  # the epoch's first batches, with the crops they were trained on
                precise_bn(engine.module, train_batches, cfg.train.precise_bn_batches, cfg, device)
            result = evaluate(engine, cfg, val_batches, val_manifest.num_samples, device)
        epoch += 1
        step_in_epoch = 0
        tag = trainer.save(f"epoch-{epoch:03d}")
        stop.clock.saved()
        per_epoch = (time.time() - started) / (epoch - first_epoch)
        log.announce("eval", epoch=epoch - 1, epochs=cfg.schedule.epochs, step=engine.global_steps, **result,
                     train_corrupt=corrupt, epoch_s=time.time() - epoch_start,
                     eta_s=per_epoch * (cfg.schedule.epochs - epoch))
        if epoch < cfg.schedule.epochs and stop.settle(device):
            trainer.end_after_stop(tag)
    dist.barrier()
    if is_primary():
        print(report.write(run_dir), flush=True)
    return result
