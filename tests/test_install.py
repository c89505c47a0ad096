"""scripts/install.sh refuses a filesystem too small for the environment before pip writes anything."""

from __future__ import annotations

import os
import subprocess
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
