"""The GPU check in one command, for a CUDA machine without network (benchmarks/gpu.sh runs it):

    python benchmarks/gpu.py [--out docs/results/gpu.json] [--results DIR] [--skip SECTION ...]

Sections, in this order, each in a process of its own (one section's failure, process group or environment
never reaches the next), each written as soon as it ends to DIR/<section>.json (default $OUT where that is
set, else a folder in the system's temp: outside the checkout, so a run cut off keeps what it measured) and
merged into --out; a section that fails records its error and the next one runs. docs/gpu.md names every key:

- gpu_tests: the `gpu`-marked tests (pytest -m gpu), with CUDA visible.
- resnet50_eager: ResNet-50 training images/s at 32 images per GPU (the paper's n, where a step is bound by
  kernel launches) and at 256, bf16 autocast, channels_last, synthetic input on the GPU, through our engine
  (DeepSpeed, our SGD and schedule, the overlapped buckets) beside plain PyTorch (torchvision's ResNet-50,
  torch's SGD with the same settings, no DeepSpeed), measured in the same process.
- demo_bf16: the demo end to end on one GPU over NCCL in bf16: trained, stopped mid-run with Ctrl-C (a
  checkpoint at the stop), resumed, evaluated; Fashion-MNIST from $FASHION_MNIST_DIR.
- decode: images/s of the GPU JPEG decoder that pipeline.data.decode uses (torchcodec's, else torchvision's:
  nvJPEG, batched), of our whole GPU path (data.decode=gpu: decode, crop, resize, flip on the GPU), and of our
  CPU training loader through the DataLoader with one worker per core, on JPEGs with ImageNet's size and bytes
  per pixel.
- resnet50_run, resnet50_run_gpu_decode: a short real ResNet-50 run from shards of those JPEGs (bf16), decoding
  on the CPU and on the GPU (data.decode=gpu): images/s with evaluation included, and the share of time
  rank 0 waited for data.
- resnet50_compiled: resnet50_eager with torch.compile on both sides (train.compile=true for ours).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("gpu_tests", "resnet50_eager", "demo_bf16", "decode", "resnet50_run", "resnet50_run_gpu_decode",
            "resnet50_compiled")
BATCH = 256  # images per step for the loader and run sections: n=32 leaves an H200 waiting on kernel launches
MODEL_BATCHES = (32, 256)  # images per GPU of the model sections: the presets' n, and the GPU's fill
# What a section may not inherit: a process group's environment makes pipeline.submit's ranks skip
# submitit's set-up and collide on a port
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
IMAGE_SIDES = (500, 375)  # ImageNet's typical size
GRAIN = 44  # pixel noise that brings JPEGs at quality 90 to ImageNet's ~0.8 bytes per pixel (measured)


def python_module(*args: str, timeout: float, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """python -m ARGS from the checkout root, output captured."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **popen)


def gpu_tests() -> dict:
    started = time.time()
    result = python_module("pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests", timeout=300)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    counts = {word: int(number) for number, word in
              (part.split()[:2] for part in summary.split(" in ")[0].split(", ") if part.split()[0].isdigit())}
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "seconds": round(time.time() - started, 1), "summary": summary,
            "failures": result.stdout[-3000:] if result.returncode else ""}


def images_per_second(step, batch: int, steps: int = 30, warmup: int = 10) -> float:
    """`batch` images per call of step(), timed over `steps` calls after `warmup`, device synchronised."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def resnet50(compiled: bool) -> dict:
    """Ours against plain PyTorch at each of MODEL_BATCHES, the same model, optimizer settings, precision and
    input, in this process; its process group is destroyed at the end."""
    import torch.distributed as dist

    from pipeline import config
    from pipeline.train import distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("GPU_BENCH_PORT", "29533"))
    result = {}
    try:
        for batch in MODEL_BATCHES:
            cfg = config.apply_overrides(config.preset("goyal_r50_bs256"), [
                "cluster.gpus_per_node=1", f"train.micro_batch={batch}", "train.precision=bf16",
                "cluster.backend=nccl", f"train.compile={str(compiled).lower()}"])
            device = distributed.init_distributed(cfg) if not dist.is_initialized() else torch.device("cuda", 0)
            x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (batch,), device=device)
            ours, plain = ours_img_s(cfg, x, y), plain_img_s(compiled, x, y)
            result[str(batch)] = {"ours_img_s": ours, "plain_img_s": plain, "ratio": ours / plain}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {**result, "tf32": torch.backends.cuda.matmul.allow_tf32}


def ours_img_s(cfg, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training images/s of ResNet-50 through our engine (build_engine: DeepSpeed, our SGD and schedule,
    the overlapped buckets)."""
    from pipeline import config, dsconfig
    from pipeline.train import engine, model

    plan = config.resolve(cfg)
    ours = engine.build_engine(model.build(cfg.model).to(x.device), cfg, plan, dsconfig.load_ds_config(cfg, plan),
                               channels_last=True)

    def step():
        loss = torch.nn.functional.cross_entropy(ours(x).float(), y)
        ours.backward(loss)
        ours.step()

    return images_per_second(step, len(x))


def plain_img_s(compiled: bool, x: torch.Tensor, y: torch.Tensor) -> float:
    """Training images/s of torchvision's ResNet-50 with torch's SGD (the same settings) and bf16 autocast."""
    import torchvision

    plain = torchvision.models.resnet50().to(x.device, memory_format=torch.channels_last)
    forward = torch.compile(plain) if compiled else plain
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return images_per_second(step, len(x))


def imagenet_like_jpeg(seed: int) -> bytes:
    """A 500x375 JPEG at quality 90 with ImageNet's bytes per pixel: smooth colour fields under grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIDES
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = (np.asarray(base, dtype=np.float32) + rng.normal(0, GRAIN, (height, width, 1))
              + rng.normal(0, GRAIN / 2, (height, width, 3)))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_tree(root: Path, classes: int, train_per_class: int, val_per_class: int) -> None:
    """An ImageNet-style folder tree of imagenet_like_jpeg images, made on every core."""
    jobs = [(split, c, i) for split, per in (("train", train_per_class), ("val", val_per_class))
            for c in range(classes) for i in range(per)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        blobs = pool.map(imagenet_like_jpeg, range(len(jobs)), chunksize=64)
        for (split, c, i), blob in zip(jobs, blobs):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{c}_{i}.JPEG").write_bytes(blob)


def decode(work: Path) -> dict:
    """GPU decoding (decode_full's decoder on CUDA, batches of BATCH), our GPU path, and our CPU loader on every
    core."""
    from pipeline.config import DataConfig
    from pipeline.data.batched_crop import crop_resize_flip
    from pipeline.data.decode import _resized_crop, decode_full_batch, decode_on_device, stack, torchcodec_decode_jpeg
    from pipeline.data.manifest import load_manifest
    from pipeline.data.streams import train_batch, train_stream
    from pipeline.data.workers import loader
    from pipeline.shards.convert import convert

    tree, shards = work / "tree", work / "shards"
    write_tree(tree, classes=8, train_per_class=1024, val_per_class=64)
    convert(tree, shards, shard_samples=256, workers=os.cpu_count())
    blobs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
             for p in sorted((tree / "train").rglob("*.JPEG"))[:BATCH * 4]]
    result = {"mean_kb": float(np.mean([len(b) for b in blobs]) / 1e3),
              "bytes_per_pixel": float(np.mean([len(b) for b in blobs]) / (IMAGE_SIDES[0] * IMAGE_SIDES[1]))}
    batches = [blobs[i:i + BATCH] for i in range(0, len(blobs), BATCH)]
    cuda = torch.device("cuda")
    for batch in batches[:2]:
        decode_full_batch(batch, cuda)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        for batch in batches:
            decode_full_batch(batch, cuda)
    torch.cuda.synchronize()
    result["gpu_decode_img_s"] = 3 * len(blobs) / (time.perf_counter() - started)
    result["gpu_decoder"] = "torchcodec" if torchcodec_decode_jpeg is not None else "torchvision"
    gpu_data = DataConfig(decode="gpu")
    samples = [{"jpg": bytes(b.numpy()), "cls": b"0", "__key__": str(i), "__url__": "memory"} for i, b in enumerate(blobs)]
    encoded = [train_batch(samples[i:i + BATCH], gpu_data, [i]).images for i in range(0, len(samples), BATCH)]
    decode_on_device(encoded[0], gpu_data, cuda, on_corrupt=print)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        for batch in encoded:
            decode_on_device(batch, gpu_data, cuda, on_corrupt=print)
    torch.cuda.synchronize()
    result["gpu_path_img_s"] = 3 * len(blobs) / (time.perf_counter() - started)  # decode, crop, resize, flip
    images, first = decode_full_batch(batches[0], cuda), encoded[0]
    for key, crops in (("gpu_crops_batched_img_s", lambda: crop_resize_flip(images, first.boxes, first.flips, 224)),
                       ("gpu_crops_one_by_one_img_s", lambda: stack([
                           _resized_crop(image, 1.0, 1.0, *box, 224).flip(-1) if flip else
                           _resized_crop(image, 1.0, 1.0, *box, 224)
                           for image, box, flip in zip(images, first.boxes, first.flips)]))):
        crops()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            crops()
        torch.cuda.synchronize()
        result[key] = 10 * len(images) / (time.perf_counter() - started)
    manifest = load_manifest(shards, "train")
    workers = os.cpu_count()
    data = DataConfig(shards=str(shards), train_samples=manifest.num_samples, workers=workers)
    batches_per_epoch = manifest.num_samples // BATCH
    stream = train_stream(manifest, data, BATCH, batches_per_epoch, 0, 1, 1, 0)
    stream.set_epoch(0)
    it = iter(loader(stream, data, pin_memory=True))
    for _ in range(workers):  # every worker has started and made its first batch
        next(it)
    started, counted = time.perf_counter(), 0
    for batch in it:
        counted += len(batch.labels)
    result["cpu_loader_img_s"] = counted / (time.perf_counter() - started)
    result["cpu_workers"] = workers
    return result


def run_records(run_dir: Path) -> list[dict]:
    from pipeline.train import metrics

    return metrics.read(run_dir / "metrics.jsonl")


def resnet50_run(work: Path, decode_on: str) -> dict:
    """python -m pipeline.submit on the decode section's shards: two epochs of ResNet-50 in bf16 from shards,
    decoding on the CPU or the GPU (data.decode)."""
    from pipeline.data.manifest import load_manifest

    shards = work / "shards"
    train, val = load_manifest(shards, "train"), load_manifest(shards, "val")
    run_dir = work / f"r50-{decode_on}"
    result = python_module(
        "pipeline.submit", "--preset", "goyal_r50_bs256", "--cluster", "local", "--gpus-per-node", "1",
        "--cpus-per-task", str(os.cpu_count()), "--run-dir", str(run_dir), f"data.shards={shards}",
        f"data.train_samples={train.num_samples}", f"data.val_samples={val.num_samples}", "model.num_classes=8",
        f"data.workers={os.cpu_count() - 1}", "train.precision=bf16", f"train.micro_batch={BATCH}", "train.log_every=2",
        "schedule.epochs=2", f"data.decode={decode_on}", timeout=300)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    records = run_records(run_dir)
    iters = [r for r in records if r["_type"] == "train_iter"][1:]  # the first window holds the start-up
    evals = [r for r in records if r["_type"] == "eval"]
    from pipeline.data.decode import torchcodec_decode_jpeg

    return {"img_s_train": float(np.median([r["img_s"] for r in iters])),
            "data_wait": float(np.mean([r["data_wait"] for r in iters])),
            "decoder": ("cpu" if decode_on == "cpu" else
                        "torchcodec" if torchcodec_decode_jpeg is not None else "torchvision"),
            "img_s_with_eval": train.num_samples * len(evals) / sum(r["epoch_s"] for r in evals),
            "train_samples": train.num_samples, "batch": BATCH}


def demo_bf16(work: Path) -> dict:
    """The demo on one GPU (grad_accum 2 keeps its kn=64), bf16 over NCCL: stopped with Ctrl-C after step 400,
    resumed by the same command, finished."""
    args = ["pipeline.submit", "--preset", "demo", "--cluster", "local", "--gpus-per-node", "1", "--run-dir",
            str(work / "demo"), f"data.shards={work / 'demo-shards'}", "train.grad_accum=2", "train.precision=bf16",
            "cluster.backend=nccl", "data.workers=4"]
    from pipeline.shards import demo
    from pipeline.shards.convert import convert

    demo.write_image_tree(work / "demo-images")
    convert(work / "demo-images", work / "demo-shards", workers=os.cpu_count())
    started = time.time()
    launcher = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    while not any(r["_type"] == "train_iter" and r["step"] >= 400 for r in run_records(work / "demo")):
        if launcher.poll() is not None:
            raise RuntimeError(f"the demo ended before step 400: {launcher.communicate()[1][-2000:]}")
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=120)
    resumed = python_module(*args, timeout=300)
    if resumed.returncode:
        raise RuntimeError(resumed.stderr[-2000:])
    records = run_records(work / "demo")
    steps = [r["step"] for r in records if r["_type"] == "train_iter"]
    stop = next(r for r in records if r["_type"] == "stop")
    report = json.loads((work / "demo" / "report.json").read_text())
    return {"stopped_exit_code": launcher.returncode, "stopped_at_step": stop["step"],
            "every_step_once": len(steps) == len(set(steps)), "top1_err": report["final_top1_err"],
            "img_s": report["img_s"], "seconds": round(time.time() - started, 1),
            "stop_line": next((line for line in out.splitlines() if line.startswith("stopped after")), err[-300:])}


def run_section(name: str, work: Path) -> dict:
    """One section in this process."""
    runs = {"gpu_tests": gpu_tests, "resnet50_eager": lambda: resnet50(False), "demo_bf16": lambda: demo_bf16(work),
            "decode": lambda: decode(work), "resnet50_run": lambda: resnet50_run(work, "cpu"),
            "resnet50_run_gpu_decode": lambda: resnet50_run(work, "gpu"),
            "resnet50_compiled": lambda: resnet50(True)}
    return runs[name]()


def section_env() -> dict:
    """The environment of a section's process: ours, without a process group's variables."""
    return {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}


def run_sections(names: list[str], work: Path, results_dir: Path, out: Path, header: dict) -> dict:
    """Every section in a process of its own (this script with --section), in order; each one's result (or its
    error, or its exit) written to results_dir/<name>.json when it ends, and all so far merged into out."""
    results = {**header, "sections": {}}
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        started = time.time()
        path = results_dir / f"{name}.json"
        path.unlink(missing_ok=True)
        try:
            child = subprocess.run([sys.executable, __file__, "--section", name, "--work", str(work),
                                    "--results", str(results_dir)], cwd=ROOT, env=section_env(), timeout=900,
                                   capture_output=True, text=True)
            section = (json.loads(path.read_text()) if path.is_file() else
                       {"error": f"the section's process exited with {child.returncode}: {child.stderr[-2000:]}"})
        except subprocess.TimeoutExpired:
            section = {"error": "the section ran past 900 s and was stopped"}
        section["section_s"] = round(time.time() - started, 1)
        path.write_text(json.dumps(section, indent=2) + "\n")
        results["sections"][name] = section
        print(name, json.dumps(section), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu.json")
    parser.add_argument("--results", type=Path,
                        default=Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "gpu-bench-results"),
                        help="a folder outside the checkout for one JSON per section (default $OUT, else the temp's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections not to run")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # one section, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # the sections' shared scratch folder
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if args.section:
        try:
            section = run_section(args.section, args.work)
        except Exception as err:  # record it: the other sections' numbers still count
            section = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        (args.results / f"{args.section}.json").write_text(json.dumps(section, indent=2) + "\n")
        return 0
    header = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        run_sections([name for name in SECTIONS if name not in args.skip], Path(tmp), args.results, args.out, header)
    print(f"wrote {args.out} and one JSON per section in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
