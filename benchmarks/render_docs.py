"""Render docs/measured.md from the benchmarks' JSON in docs/results/, and the study's tables in README.md and
docs/reproduce.md from docs/study/epochs*/table1.json, so the pages cannot drift from them.

    python benchmarks/render_docs.py                  # rewrite the pages from the JSON
    python benchmarks/render_docs.py --demo RUN_DIR   # first take the demo's numbers from its run folder
    python benchmarks/render_docs.py --study runs/study  # first take the study's finished runs (both budgets)

Each benchmark writes its JSON into docs/results/ (its --out default); rerun one, then this script, and
commit both. --study copies every finished (or diverged) run of a local study (python -m pipeline.reproduce)
into docs/study/epochs<E>/runs/ (metrics.jsonl, config.json and report.json: no checkpoints), then rebuilds
each budget's table and figures there. tests/test_docs.py fails when a page is not what this script makes of
the JSON, or a committed table not what its runs' records give.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pipeline import config  # noqa: E402
from pipeline.scaling import model as scaling  # noqa: E402
from pipeline.study import design, execute  # noqa: E402
from pipeline.study import table as study_table  # noqa: E402

RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "measured.md"
STUDY = ROOT / "docs" / "study"
STUDY_SEEDS = [0, 1, 2]
STUDY_PAGES = (ROOT / "README.md", ROOT / "docs" / "reproduce.md")
# A generated table in a page: <!-- table: docs/study/epochs18/table1.json --> ... <!-- end of table -->
TABLE_BLOCK = re.compile(r"(<!-- table: (\S+) -->\n).*?(<!-- end of table -->)", re.S)
R50_GRAD_ELEMENTS = 25_557_032  # ResNet-50's trainable parameters


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def demo(result: dict) -> list[str]:
    return ["## The demo", "",
            f"`bash scripts/demo.sh` (`--preset demo`: {result['plan']}) on this machine's {result['cpu_count']} "
            "cores:", "",
            *table(["top-1 error", "top-5 error", "epochs", "images/s (median of the progress records)",
                    "training + evaluation"],
                   [[f"{result['final_top1_err']:.2f} %", f"{result['final_top5_err']:.2f} %", result["epochs"],
                     f"{result['img_s']:.0f}", f"{result['train_s'] / 60:.1f} min"]]),
            "", "The demo is deterministic for a given machine: the same seed gives the same losses.", ""]


def loader(result: dict) -> list[str]:
    median = result["img_s_median"]
    names = {"bare_decode_full": "bare full-size decode from memory, ours (decode_full: torchcodec)",
             "bare_decode_pil": "bare full-size decode from memory, PIL",
             "imagefolder_pil": "torchvision ImageFolder + PIL, RandomResizedCrop + flip + ToTensor + Normalize",
             "ours": "ours, streaming: shards, shuffle, crop + flip, uint8 batches of 32",
             "ours_no_draft": "ours, streaming, without reduced-size decoding",
             "ours_indexed": "ours, indexed: one positioned read per sample, crop + flip, uint8 batches of 32"}
    for key in median:
        if "dataloader" in key:  # ours[_indexed]_dataloader_<W>_workers
            workers = key.split("_")[-2]
            names[key] = (f"ours, {'indexed' if 'indexed' in key else 'streaming'}, through the DataLoader, {workers} "
                          f"workers on the {result['cpu_count']} cores")
        elif key.endswith("_processes"):  # bare_decode_full_<W>_processes
            names[key] = f"bare full-size decode, ours, {key.split('_')[-2]} processes at once (their sum)"
    rows = [[names[key], f"{value:,.0f}"] for key, value in median.items()]
    shards = result["distinct_shards_per_batch"]
    return ["## Loader (`benchmarks/loader.py`)", "",
            f"{result['images']:,} ImageNet-sized JPEGs ({result['mean_pixels'] / 1e3:.0f} kpixel, "
            f"{result['mean_kb']:.0f} KB and {result['bytes_per_pixel']:.2f} bytes per pixel on average; ImageNet's "
            f"~0.8), one core each, median of {result['rounds']} rounds:", "",
            *table(["pipeline", "images/s (one process on one core unless the row says)"], rows), "",
            f"Ours is {result['ours_vs_imagefolder']:.2f}x ImageFolder, {result['ours_vs_bare_decode']:.2f} of the "
            f"faster bare decoder ({result['ours_vs_bare_decode_pil']:.2f} of PIL's); reduced-size decoding gives "
            f"{result['draft_speedup']:.2f}x. Indexed access runs at {result['indexed_vs_stream']:.3f} of streaming "
            f"(per-round median). A batch of 32 draws from {shards['indexed']:.1f} distinct shards of the "
            f"{result['shards']} with indexed access, from {shards['stream']:.1f} when streaming.", "",
            f"Paired, batch by batch (ours on a batch of the indexed stream, then bare decode of the same JPEGs, in "
            f"turn, so that the machine's drift cancels): ours makes {result['ours_vs_bare_decode_paired']:.2f} of "
            "the bare decode rate. Through the DataLoader, each indexed worker makes "
            f"{result['ours_indexed_dataloader_per_worker_vs_bare_decode']:.2f} of the bare decode rate of one core, "
            f"and the workers together {result['ours_indexed_dataloader_vs_bare_decode_parallel']:.2f} of bare decode "
            "running in as many processes at once.", ""]


def shards(result: dict) -> list[str]:
    rows = [[name.replace("_", " "), f"{result['img_s'][name]:,.0f}", f"{result['mb_s'][name]:,.1f}"]
            for name in result["img_s"]]
    return ["## Shard conversion (`benchmarks/shards.py`)", "",
            f"{result['images']:,} such JPEGs, {result['mb']:.0f} MB, page cache warm, median of "
            f"{result['rounds']} rounds:", "",
            *table(["", "images/s", "MB/s"], rows), "",
            f"One converter process runs at {result['convert_vs_tar']:.2f} of `tar`, two at "
            f"{result['workers_2_speedup']:.2f}x one: the converter decodes every image to check it and hashes "
            "every shard, tar only copies bytes.", ""]


def allreduce(result: dict) -> list[str]:
    names = {"deepspeed": "DeepSpeed's own stage 0", "buckets": "our overlapped buckets", "ddp": "torch DDP",
             "local": "no communication"}
    rows = [[names[mode], f"{seconds * 1e3:.0f}",
             f"{result['exposed_communication_s'][mode] * 1e3:.0f}" if mode in result["exposed_communication_s"]
             else "-"] for mode, seconds in result["step_s"].items()]
    ratio = result["median_ratio"]
    return ["## Gradient allreduce (`benchmarks/allreduce.py`)", "",
            f"ResNet-50 at {result['image']}x{result['image']}, {result['micro_batch']} images per rank, "
            f"{result['ranks']} gloo ranks with {result['threads']} thread each, buckets of "
            f"{result['bucket_elements']:,} elements, median of {result['rounds']} interleaved rounds of "
            f"{result['steps']} steps:", "",
            *table(["mode", "ms per step", "communication not hidden, ms"], rows), "",
            f"Per-round ratios (medians): ours / DeepSpeed {ratio['buckets/deepspeed']:.3f}, ours / DDP "
            f"{ratio['buckets/ddp']:.3f}, DeepSpeed / DDP {ratio['deepspeed/ddp']:.3f}. The cores are shared by "
            "compute and gloo's threads, so even DDP leaves communication exposed.", ""]


def scaling_runs(result: dict) -> list[str]:
    rows = [[row["ranks"], row["mode"], f"{row['measured_s'] * 1e3:.0f}", f"{row['predicted_s'] * 1e3:.0f}",
             f"{row['error']:+.1%}", f"{row['error_own_compute']:+.1%}"] for row in result["rows"]]
    link = result["link"]
    return ["## The scaling model against this machine (`benchmarks/scaling.py`)", "",
            f"ResNet-50 at {result['image']}x{result['image']}, {result['micro_batch']} per rank, through "
            f"`tune_buckets` on 1, 2 and 3 local ranks. Fitted link: {link['latency_s'] * 1e6:.0f} us, "
            f"{link['bandwidth_Bps'] / 1e9:.2f} GB/s.", "",
            *table(["ranks", "mode", "measured ms", "predicted ms", "error", "error with the run's own compute"],
                   rows), "",
            "The model leaves out the memory traffic of flattening the gradients and the cores gloo takes from "
            "compute, which a GPU with a NIC does not share: it under-predicts here.", ""]


def paper() -> list[str]:
    """Computed now from the model: the paper's 8k run on its own cluster."""
    cfg = config.preset("goyal_r50_bs8k")
    per_gpu = cfg.train.micro_batch
    run, node, off = (scaling.predict(scaling.PAPER, R50_GRAD_ELEMENTS, nodes, 8, per_gpu, bucket)
                      for nodes, bucket in ((32, 6_553_600), (1, 6_553_600), (32, None)))
    node_off = scaling.predict(scaling.PAPER, R50_GRAD_ELEMENTS, 1, 8, per_gpu, None)
    return ["## The scaling model on the paper's cluster (`python -m pipeline.scaling`)", "",
            "32 servers of 8 P100s over 50 Gbit Ethernet, ResNet-50 at 32 images per GPU, buckets of 6,553,600:", "",
            *table(["", "step ms", "images/s", "efficiency from 8 to 256 GPUs"],
                   [["8 GPUs", f"{node.step_s * 1e3:.1f}", f"{node.images_s:,.0f}", ""],
                    ["256 GPUs, buckets", f"{run.step_s * 1e3:.1f}", f"{run.images_s:,.0f}",
                     f"{scaling.efficiency(run, node):.1%}"],
                    ["256 GPUs, one allreduce after backward", f"{off.step_s * 1e3:.1f}", f"{off.images_s:,.0f}",
                     f"{scaling.efficiency(off, node_off):.1%}"]]), "",
            "The paper reports ~90% (5.5); its 29-hour 8-GPU baseline implies 232 ms per step.", ""]


def render() -> str:
    """docs/measured.md from the JSON files that are there."""
    lines = ["# Measured", "",
             "Generated by `python benchmarks/render_docs.py` from the benchmarks' JSON in `docs/results/`; do not edit "
             "by hand. Measured on a 2-core, 24 GiB CPU machine with gloo; no GPU has run these yet.", ""]
    for name, section in (("demo", demo), ("loader", loader), ("shards", shards), ("allreduce", allreduce),
                          ("scaling", scaling_runs)):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            lines += section(json.loads(path.read_text()))
    return "\n".join(lines + paper()).rstrip() + "\n"


def take_demo(run_dir: Path) -> None:
    """docs/results/demo.json from a finished demo run folder."""
    report = json.loads((run_dir / "report.json").read_text())
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    summary = (f"{plan['world_size']} processes, global batch {plan['global_batch']}, peak lr {plan['peak_lr']:g}, "
               f"{plan['total_steps']} steps")
    (RESULTS / "demo.json").write_text(json.dumps({**report, "plan": summary, "cpu_count": os.cpu_count()},
                                                  indent=1) + "\n")


def study_runs(epochs: int) -> list[design.StudyRun]:
    """The runs of the committed study at a budget: its default rows, STUDY_SEEDS."""
    return design.runs(design.budget_rows(epochs), STUDY_SEEDS, config.preset("study"), [])


def committed_budgets() -> list[int]:
    """The budgets (epochs) of the committed study: its docs/study/epochs<E>/ folders."""
    return sorted(int(path.name[len("epochs"):]) for path in STUDY.glob("epochs*")
                  if path.is_dir() and path.name[len("epochs"):].isdigit())


def take_study(root: Path) -> None:
    """Copy the ended runs of the local study in root (root/epochs<E>/runs/) into docs/study, the shard folder
    in their config.json made relative to the project."""
    for budget in sorted(d for d in root.glob("epochs*") if d.is_dir() and d.name[len("epochs"):].isdigit()):
        epochs = int(budget.name[len("epochs"):])
        for run in study_runs(epochs):
            source, target = budget / "runs" / run.folder, STUDY / budget.name / "runs" / run.folder
            if not source.is_dir() or study_table.run_state(source) == "unfinished":
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "report.json"):
                if (source / name).is_file():
                    shutil.copyfile(source / name, target / name)
            saved = json.loads((source / "config.json").read_text())
            shards = Path(saved["config"]["data"]["shards"])
            if shards.is_absolute() and shards.is_relative_to(ROOT):
                saved["config"]["data"]["shards"] = str(shards.relative_to(ROOT))
            (target / "config.json").write_text(json.dumps(saved, indent=2) + "\n")


def table_block(path: str) -> str:
    """A page's generated table: the rows and the kn* line of a committed table1.json."""
    built = json.loads((ROOT / path).read_text())
    return study_table.rows_markdown(built) + "\n\n" + study_table.verdict(built) + "\n"


def render_study_page(text: str) -> str:
    """The page with every generated table block rewritten from its table1.json."""
    return TABLE_BLOCK.sub(lambda m: m.group(1) + table_block(m.group(2)) + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, metavar="RUN_DIR", help="a finished demo run to take the numbers from")
    parser.add_argument("--study", type=Path, metavar="DIR", help="a local study (--out of pipeline.reproduce) to "
                                                                  "take the ended runs from")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.demo:
        take_demo(args.demo)
    if args.study:
        take_study(args.study)
    for epochs in committed_budgets():  # every budget's table and figures from its committed runs
        execute.write_results(STUDY / f"epochs{epochs}", study_runs(epochs))
    PAGE.write_text(render())
    for page in STUDY_PAGES:
        page.write_text(render_study_page(page.read_text()))
    print(f"wrote {PAGE}, {', '.join(str(p) for p in STUDY_PAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
