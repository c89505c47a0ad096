"""scripts/install.sh refuses a filesystem too small for the environment before pip writes anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 MiB tmpfs: far below the ~6 GiB the environment takes."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_install_refuses_a_full_disk_before_pip(small_filesystem):
    venv = small_filesystem / "not yet" / "venv"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True,
                          env={**os.environ, "PIPELINE_VENV": str(venv)}, timeout=120)
    assert done.returncode == 1
    assert "needs about 7 GiB free" in done.stderr
    assert str(small_filesystem) in done.stderr and "PIPELINE_VENV" in done.stderr
    assert not any(small_filesystem.iterdir())


def test_gpu_sections_run_in_their_own_processes_and_each_writes_its_json(tmp_path, monkeypatch):
    """benchmarks/gpu.py runs every section in a process of its own whose environment has no process group's
    variables (an exported RANK made every later pipeline.submit rank skip its set-up and collide on a port),
    goes on after a section fails, and writes each section's JSON as it ends, and all so far merged. On this CPU
    machine every section's process says it needs CUDA: recorded, and the next one runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29533")
    assert "RANK" not in gpu.section_env() and "MASTER_PORT" not in gpu.section_env()
    out = tmp_path / "gpu.json"
    results = gpu.run_sections(["resnet50_eager", "decode"], tmp_path / "work", tmp_path / "results", out, {"cpus": 2})
    for name in ("resnet50_eager", "decode"):
        section = json.loads((tmp_path / "results" / f"{name}.json").read_text())
        assert "exited with 2" in section["error"] and "needs a CUDA GPU" in section["error"]
    assert json.loads(out.read_text()) == results and list(results["sections"]) == ["resnet50_eager", "decode"]
