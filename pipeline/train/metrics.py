"""Tagged JSON-lines metrics (`{"_type": "train_iter", ...}`) and the progress lines made from them."""

from __future__ import annotations

import json
import time
from pathlib import Path


# TensorBoard tag of each scalar a record carries, by record type.
BOARD_TAGS = {
    "train_iter": {"lr": "train/lr", "loss": "train/loss", "train_err": "train/top1_err", "img_s": "train/images_per_s",
                   "data_wait": "train/data_wait", "noise_scale": "noise/b_simple", "noise_g2": "noise/grad_sq",
                   "noise_trace": "noise/trace_sigma"},
    "eval": {"top1_err": "val/top1_err", "top5_err": "val/top5_err"},
}


class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl; a no-op on every rank but the primary."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self.board = None

    def add_tensorboard(self, purge_step: int) -> None:
        """Also write the scalars of train_iter and eval records (BOARD_TAGS) as TensorBoard events into the
        metrics file's folder, so that `tensorboard --logdir` over several run folders overlays them. Events
        at or after purge_step from an earlier attempt are hidden: a resumed run logs those steps again."""
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(self.path.parent), purge_step=purge_step or None)

    def write(self, _type: str, **fields) -> dict:
        """Append a record tagged `_type` with a wall-clock `time`; returns it."""
        record = {"_type": _type, "time": round(time.time(), 3), **fields}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.board is not None and _type in BOARD_TAGS:
            for key, tag in BOARD_TAGS[_type].items():
                if record.get(key) is not None:
                    self.board.add_scalar(tag, record[key], global_step=record["step"], walltime=record["time"])
            self.board.flush()  # a record every log_every steps: cheap, and nothing is lost to a crash
        return record

    def announce(self, _type: str, **fields) -> dict:
        """write(), and its progress line on the primary's stdout: the one place a rank prints its progress
        (a run's resume, evaluations, a stop, a divergence)."""
        record = self.write(_type, **fields)
        if self.enabled:
            print(progress_line(record), flush=True)
        return record


def read(path: Path) -> list[dict]:
    """Every complete record of a metrics file (a half-written last line is ignored)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def duration(seconds: float) -> str:
    """1h02m, 4m05s, 37s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(record: dict) -> str | None:
    """The human line for a record, or None for records that get none."""
    kind = record.get("_type")
    if kind == "train_iter":
        return (f"step {record['step']}/{record['total_steps']} epoch {record['epoch'] + 1} "
                f"lr {record['lr']:.4g} loss {record['loss']:.4f}"
                + (f" train_err {record['train_err']:.2f}%" if "train_err" in record else "")
                + f" {record['img_s']:.0f} img/s"
                + (f", {record['data_wait']:.0%} waiting for data" if "data_wait" in record else "")
                + (f", noise scale {record['noise_scale']:.0f}" if record.get("noise_scale") is not None else ""))
    if kind == "eval":
        corrupt = record.get("train_corrupt", 0)
        return (f"epoch {record['epoch'] + 1}/{record['epochs']} done: top1_err {record['top1_err']:.2f}% "
                f"top5_err {record['top5_err']:.2f}% on {record['num_samples']} images, "
                f"epoch {duration(record['epoch_s'])}, eta {duration(record['eta_s'])}"
                + (f"; {corrupt} corrupt training images replaced (see the ranks' stderr)" if corrupt else ""))
    if kind == "stop":
        return (f"stopped after step {record['step']} ({record['signal'] or 'signal on another rank'}): "
                f"checkpoint {record['checkpoint']} complete; "
                + ("job requeued, it resumes there" if record["requeued"] else record["message"]))
    if kind == "diverged":
        return (f"diverged: the loss was not finite by step {record['step']} (lr {record['lr']:.4g}); the run stopped "
                f"without requeueing; newest good checkpoint: {record['checkpoint'] or 'none'}")
    if kind == "failed":
        causes = ([] if record["exit_code"] is None else [f"srun exit status {record['exit_code']}"]) + record["tasks"]
        return f"job {record['job_id']} failed" + (f" ({'; '.join(causes)})" if causes else "") + f": {record['reason']}"
    if kind == "save_failed":
        return f"stopped: {record['message']}"
    if kind == "resume":
        before = record.get("ranks_before", record.get("ranks"))
        redone = record.get("superseded_steps")
        skipped = "".join(f"skipped checkpoint {s['tag']} (step {s['step']}): {s['why']}; kept aside as {s['kept_as']}, "
                          f"{s['step'] - record['step']} step{'s' if s['step'] - record['step'] != 1 else ''} to "
                          "train again; " for s in record.get("skipped") or [])
        return (f"{skipped}resumed from {record['checkpoint']} at epoch {record['epoch']}, step {record['step']}"
                + (f", on {record['ranks']} ranks (it ran on {before})" if before != record.get("ranks") else "")
                + (f"; steps {redone[0]}-{redone[1]} run again, their new records supersede the earlier ones"
                   if redone else ""))
    return None
