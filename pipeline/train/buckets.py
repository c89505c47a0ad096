"""Gradient allreduce in buckets, started during backward (paper 4: communication pipelined with backprop),
for a DeepSpeed engine at ZeRO stage 0, whose own allreduce waits for the end of backward.

`zero_optimization.overlap_comm` turns it on and `reduce_bucket_size` sizes the buckets (pipeline.dsconfig
reads both). docs/buckets.md says what it does, what it refuses and why; in short: buckets fill in reverse
registration order and start from post-accumulate-grad hooks, in the same order on every rank, and an
optimizer step pre-hook starts the rest, waits, and writes the averages back into the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.dsconfig import bucket_elements
from pipeline.train import noise


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.ready: set[int] = set()  # ids of the parameters whose gradient is final at this boundary
        self.buffer: torch.Tensor | None = None
        self.work: dist.Work | None = None
        self.versions: list[int] = []  # each gradient's version when it went into the buffer
        self.previous: torch.Tensor | None = None  # the step before's reduced gradient (noise pairing of steps)


def _slot(buffer: torch.Tensor, offset: int, grad: torch.Tensor) -> torch.Tensor:
    """The gradient's place in a bucket's flat buffer, viewed in the gradient's own memory order where it is
    channels_last (a conv weight's on GPU: NHWC): the copies in and out are then plain memory copies, where an
    NCHW view of the slot would transpose them element by element. Every rank's gradients have the same
    layout, so the buffers line up element for element across ranks."""
    flat = buffer[offset:offset + grad.numel()]
    if grad.dim() == 4 and not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last):
        return flat.as_strided(grad.shape, grad.stride())
    return flat.view(grad.shape)


class BucketedAllreduce:
    """Overlapped stage-0 gradient allreduce for a DeepSpeed engine; replaces DeepSpeed's own."""

    def __init__(self, engine, bucket_elements: int):
        if bucket_elements < 1:
            raise ValueError(f"zero_optimization.reduce_bucket_size={bucket_elements}; it must be at least 1 element")
        self.engine = engine
        self.dtype = engine.communication_data_type
        # DeepSpeed's own stage-0 reduction group: its clone of the world, not the default group, so that
        # our buckets never queue behind other collectives in flight on the default group (the training
        # loop's asynchronous stop flag, preempt.StopRequest.poll).
        self.group = engine.seq_data_parallel_group
        if not isinstance(engine.optimizer, torch.optim.Optimizer):
            raise ValueError(f"overlap_comm at stage 0 needs DeepSpeed to step a torch optimizer directly, but it "
                             f"wraps it in {type(engine.optimizer).__name__}; set overlap_comm to false")
        if engine.gradient_clipping() or getattr(engine, "torch_autocast_z0_gradscaler", None):
            raise ValueError("overlap_comm at stage 0 reduces the gradients just before the optimizer step, after "
                             "gradient clipping and fp16 loss unscaling would have seen them unreduced; turn "
                             "those off or set overlap_comm to false")
        params = self._trainable()
        self.names = {id(p): name for name, p in engine.module.named_parameters()}
        self.buckets: list[_Bucket] = []
        group: list[torch.nn.Parameter] = []
        filled = 0
        for param in reversed(params):
            group.append(param)
            filled += param.numel()
            if filled >= bucket_elements:
                self.buckets.append(_Bucket(group))
                group, filled = [], 0
        if group:
            self.buckets.append(_Bucket(group))
        self.bucket_of = {param: bucket for bucket in self.buckets for param in bucket.params}
        self.next = 0  # the first bucket not started yet
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self.handles.append(engine.optimizer.register_step_pre_hook(lambda *_: self.finish()))
        self.deepspeed_allreduce = engine.enable_backward_allreduce
        engine.enable_backward_allreduce = False  # while attached, ours replaces DeepSpeed's post-backward allreduce
        self.meter: noise.NoiseMeter | None = None
        self.steps_measured = 0

    def measure_noise(self, pair: noise.Pairing) -> noise.NoiseMeter:
        """Feed a NoiseMeter the squared norms of the pairing's gradients (pipeline.train.noise): in the
        buckets before and after the allreduce, and for micro-batches from a hook on each parameter that sees
        each backward's gradient before it is accumulated."""
        self.meter = noise.NoiseMeter(pair, self.buckets[0].params[0].device)
        if pair.kind == "micro-batches":
            # DeepSpeed's backward divides the loss by the accumulation steps: undo it in the norm
            scale = float(self.engine.gradient_accumulation_steps()) ** 2
            self.handles += [p.register_hook(lambda grad: self.meter.add_small(scale * noise.squared_norm(grad)))
                             for p in self._trainable()]
        return self.meter

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad and p.numel() > 0]

    def _ready(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: param.grad holds this backward's sum; start what is complete."""
        if not self.engine.is_gradient_accumulation_boundary() or self.engine.inside_no_sync_ctxt:
            return
        bucket = self.bucket_of[param]
        if id(param) in bucket.ready:
            raise RuntimeError(
                f"the gradient of {self.names[id(param)]} was accumulated twice at one gradient-accumulation "
                "boundary, and its first sum may already be on the wire: either a second engine.backward() before "
                "engine.step() (call step after every backward; after an exception in backward, call "
                "engine.bucketed_allreduce.reset()), or reentrant activation checkpointing (use "
                "torch.utils.checkpoint with use_reentrant=False); or set overlap_comm to false")
        bucket.ready.add(id(param))
        while self.next < len(self.buckets) and self._complete(self.buckets[self.next]):
            self._start(self.buckets[self.next])

    @staticmethod
    def _complete(bucket: _Bucket) -> bool:
        return len(bucket.ready) == len(bucket.params)

    def _start(self, bucket: _Bucket) -> None:
        """Flatten the bucket's gradients into its buffer (in the wire type) and allreduce it, async."""
        if bucket.buffer is None:
            first = bucket.params[0]
            bucket.buffer = torch.empty(bucket.numel, dtype=self.dtype, device=first.device)
        offset = 0
        for param in bucket.params:
            if param.grad is None:  # no gradient this step: zeros, so that every rank sends the same size
                param.grad = torch.zeros_like(param)
            _slot(bucket.buffer, offset, param.grad).copy_(param.grad)
            offset += param.numel()
        bucket.versions = [param.grad._version for param in bucket.params]
        if self.meter is not None and self.meter.pair.kind == "ranks":
            self.meter.add_small(noise.squared_norm(bucket.buffer))  # this rank's gradient, n x accum images
        pre, _ = self._scales()
        if pre != 1.0:
            bucket.buffer.mul_(pre)
        # all_reduce: per-rank grads -> sum
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self.next += 1

    def _scales(self) -> tuple[float, float]:
        """(before, after) the sum: DeepSpeed's averaging (engine.allreduce_bucket)."""
        world = dist.get_world_size(self.group)
        if not self.engine.gradient_average:
            return 1.0, 1.0
        if self.engine.postscale_gradients():
            factor = self.engine.gradient_predivide_factor()
            return 1.0 / factor, factor / world
        return 1.0 / world, 1.0

    def finish(self) -> None:
        """Start the buckets still waiting, wait for all, write the averages back into the gradients."""
        trainable = self._trainable()
        if len(trainable) != len(self.bucket_of) or any(p not in self.bucket_of for p in trainable):
            names = {id(p): name for name, p in self.engine.module.named_parameters()}
            changed = sorted(names.get(id(p), "a parameter added later") for p in set(trainable) ^ set(self.bucket_of))
            self.reset()
            raise RuntimeError(f"requires_grad of {', '.join(changed)} changed after the engine was built; the "
                               "gradient buckets are fixed then: set requires_grad before building the engine, "
                               "or set overlap_comm to false")
        while self.next < len(self.buckets):
            self._start(self.buckets[self.next])
        _, post = self._scales()
        for bucket in self.buckets:
            bucket.work.wait()
            changed = [self.names[id(p)] for p, v in zip(bucket.params, bucket.versions) if p.grad._version != v]
            if changed:
                self.reset()
                raise RuntimeError(f"the gradient of {', '.join(changed)} changed between engine.backward() and "
                                   "engine.step(), after it had gone to the allreduce; change gradients in a "
                                   "post-accumulate-grad hook registered before the engine is built, or set "
                                   "overlap_comm to false")
            if post != 1.0:
                bucket.buffer.mul_(post)
            if self.meter is not None:
                self._measure(bucket)
            offset = 0
            for param in bucket.params:
                param.grad.copy_(_slot(bucket.buffer, offset, param.grad))
                offset += param.numel()
        if self.meter is not None:
            self.meter.count(*self._counts())
            self.steps_measured += 1
        self.reset()

    def _measure(self, bucket: _Bucket) -> None:
        """The reduced gradient's squared norm, as the pairing's big batch (or its small one, paired with the
        mean of it and the step before's)."""
        if self.meter.pair.kind != "consecutive steps":
            self.meter.add_big(noise.squared_norm(bucket.buffer))
            return
        self.meter.add_small(noise.squared_norm(bucket.buffer))
        if bucket.previous is None:
            bucket.previous = bucket.buffer.clone()
            return
        bucket.previous.add_(bucket.buffer)
        self.meter.add_big(noise.squared_norm(bucket.previous) / 4)  # |(G_t + G_(t-1)) / 2|^2
        bucket.previous.copy_(bucket.buffer)

    def _counts(self) -> tuple[int, int]:
        """A step's numbers of small and big gradients: each rank adds its own gradient and the average
        (both summed over ranks with the record), accumulation its micro-batches and their mean, a step
        itself and, from the second step on, its mean with the step before."""
        kind = self.meter.pair.kind
        if kind == "ranks":
            return 1, 1
        if kind == "micro-batches":
            return self.engine.gradient_accumulation_steps(), 1
        return 1, int(self.steps_measured > 0)

    def reset(self) -> None:
        """Forget this boundary: wait for the allreduces in flight (their results are dropped) and count
        every parameter not ready. finish() ends with it; call it after an exception in a backward."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.ready, bucket.work = set(), None
        self.next = 0

    def remove(self) -> None:
        """Detach the hooks and give the allreduce back to DeepSpeed."""
        self.reset()
        for handle in self.handles:
            handle.remove()
        self.engine.enable_backward_allreduce = self.deepspeed_allreduce


def attach(engine, ds_config: dict) -> BucketedAllreduce | None:
    """Our allreduce on the engine when zero_optimization.overlap_comm is true (DeepSpeed's default for
    stage 0 is false: its own allreduce after backward stays); the reducer, or None. It is also kept as
    `engine.bucketed_allreduce` (None when off)."""
    elements = bucket_elements(ds_config)
    reducer = BucketedAllreduce(engine, elements) if elements else None
    engine.bucketed_allreduce = reducer
    return reducer
