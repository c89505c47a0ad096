"""Per-epoch DeepSpeed checkpoints in the run folder, and resuming from the newest one."""

from __future__ import annotations

from pathlib import Path


def directory(run_dir: Path) -> Path:
    """Where DeepSpeed writes its checkpoint tags (and the `latest` file)."""
    return Path(run_dir) / "checkpoints"


def save(engine, run_dir: Path, epoch: int, config: dict) -> str:
    """Checkpoint after `epoch` finished epochs (collective: every rank must call it).

    DeepSpeed stores the global step (engine.global_steps) itself; the epoch and config ride along.
    """
    tag = f"epoch-{epoch:03d}"
    engine.save_checkpoint(str(directory(run_dir)), tag=tag, client_state={"epoch": epoch, "config": config})
    return tag


def resume(engine, run_dir: Path, config: dict) -> str | None:
    """Load the newest checkpoint into the engine and return its tag, or None when there is none.

    Model, optimizer (momentum buffers), lr scheduler and the global step come back through DeepSpeed; a
    checkpoint made with a different config is refused rather than silently continued.
    """
    ckpt = directory(run_dir)
    if not (ckpt / "latest").is_file():
        return None
    path, client = engine.load_checkpoint(str(ckpt))
    if path is None:
        raise RuntimeError(f"{ckpt}: 'latest' names a checkpoint DeepSpeed could not load")
    if client["config"] != config:
        raise ValueError(f"{path} was written with a different config than {Path(run_dir) / 'config.json'}; "
                         "start a new run folder instead of resuming this one")
    return Path(path).parent.name  # path is the model-states file in the tag folder
