"""What every rank runs: the training loop and everything it is made of.

- loop: stream, step, evaluate, checkpoint, stop (the rank's whole run)
- distributed: torch.distributed, the device, the rank-0 gate, BN statistics across ranks
- model, schedule, engine: the paper's ResNet init, lr as a function of the step, DeepSpeed with torch SGD
- buckets: the gradient allreduce in buckets overlapped with backward (docs/buckets.md)
- checkpoint, preempt: complete checkpoints and resuming; stop signals agreed on by all ranks (docs/preemption.md)
- metrics, report: JSON-lines metrics and the end-of-run report
- tune: the bucket-size measurement of a tuning job
"""
