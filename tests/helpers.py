"""What the tests share besides fixtures (conftest.py): a tree of real photos, small run settings, child
processes, ports, a shard folder of given samples, a damaged shard, the paper's 8k schedule."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from pipeline import config
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.shards import demo

# Paper 2.2 / 5.1 at kn=8192: 0.1 -> 3.2 over 5 epochs, then x0.1 at epochs 30, 60, 80 (epoch, lr).
GOLDEN_8K = [(0.0, 0.1), (2.5, 1.65), (5.0, 3.2), (29.9, 3.2), (30.0, 0.32), (60.0, 0.032), (80.0, 0.0032), (89.9, 0.0032)]
TRAIN_PER_CLASS = 24
VAL_PER_CLASS = 7
# A 2-rank run of the shard_dir fixture: kn=16 > reference 8, so warmup 0.0125 -> 0.025 over the first
# epoch (15 steps), x0.1 from epoch 1.5 (step 22.5).
SMALL = ["data.train_samples=240", "data.val_samples=70", "data.workers=1", "train.micro_batch=8",
         "train.log_every=1", "optim.base_lr=0.0125", "optim.reference_batch=8", "schedule.epochs=2",
         "schedule.warmup_epochs=1", "schedule.milestones=1.5"]


def write_tree(root: Path, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS) -> Path:
    """root/{train,val}/<class>/*.JPEG from the first Fashion-MNIST images of each class."""
    for split, prefix, per_class in (("train", "train", train_per_class), ("val", "t10k", val_per_class)):
        images = demo.read_idx(demo.FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = demo.read_idx(demo.FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        written = {c: 0 for c in range(len(demo.CLASSES))}
        for i, label in enumerate(labels):
            if written[label] == per_class:
                continue
            folder = root / split / demo.CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").save(folder / f"{split}_{i:05d}.JPEG", quality=95)
            written[label] += 1
            if all(v == per_class for v in written.values()):
                break
    return root


def run_module(module: str, *args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python -m module args... in a child process, output captured, Python's warnings silenced."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def write_shard_dir(path: Path, samples: list[dict], split: str = "train") -> Manifest:
    """One tar holding `samples` and the manifest describing it (no sample index)."""
    path.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path / f"{split}-000000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    manifest = {"split": split, "num_samples": len(samples), "classes": ["a", "b"], "skipped": [],
                "shards": [{"name": f"{split}-000000.tar", "num_samples": len(samples), "sha256": ""}]}
    (path / f"{split}.json").write_text(json.dumps(manifest))
    return load_manifest(path, split)


def run_here(main, capsys, *args) -> subprocess.CompletedProcess:
    """A command line's main(argv) in this process, its output taken from capsys: what run_module gives, without
    the 3-5 s of a new Python importing torch. For checks of what a command says; tests that run each command
    line as a process stay beside them."""
    try:
        code = main(list(args)) or 0
    except SystemExit as exit_:  # argparse's refusals, parser.exit
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def pick_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def truncate_sample(shard: Path, index: int, keep: int) -> str:
    """Rewrite a shard with the JPEG of its index-th sample cut to `keep` bytes; returns that sample's key."""
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard), encoder=False, mtime=0) as sink:
        for i, sample in enumerate(samples):
            jpg = sample["jpg"][:keep] if i == index else sample["jpg"]
            sink.write({"__key__": sample["__key__"], "jpg": jpg, "cls": sample["cls"]})
    return samples[index]["__key__"]


def weight_names(state: dict) -> list[str]:
    """The trained parameters of a saved module's state: BN running statistics are per-rank estimates."""
    return [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def start_rank(rank: int, world: int, port: int, cfg: config.Config | None = None):
    """One rank of a multi-process test, started as a job's rank starts: the environment torch.distributed
    reads (what submitit exports on a cluster), then the pipeline's own init_distributed with cfg. Without
    cfg: the demo's config on gloo, which keeps the rank and DeepSpeed's engine on the CPU even where GPUs are
    visible (the rank's local rank would otherwise pick a GPU that may not exist). Returns the device."""
    from pipeline.train import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if cfg is None:
        cfg = config.apply_overrides(config.preset("demo"), [f"cluster.gpus_per_node={world}", "cluster.backend=gloo"])
    return distributed.init_distributed(cfg)


def start_ranks(main, *args, ranks: int) -> None:
    """main(rank, *args) in `ranks` new processes (torch.multiprocessing's spawn), each of which ends its
    process group and then itself as soon as main returns. Left to the interpreter's teardown, about one
    2-rank run in six had a rank abort after its work was done, its process group destroyed and its results
    written ("terminate called without an active exception", SIGABRT: a native library's thread destroyed
    while joinable, in the C++ teardown), failing a test that had passed."""
    mp.start_processes(_rank_then_end, args=(main, *args), nprocs=ranks, start_method="spawn")


def _rank_then_end(rank: int, main, *args) -> None:
    main(rank, *args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # past the C++ teardown that may abort; an exception from main never reaches here
