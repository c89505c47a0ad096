"""Shared fixtures: a small ImageNet-style tree of real Fashion-MNIST photos, and its shards (helpers.py
holds the shared functions)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pipeline.shards import convert

from helpers import pick_port, write_tree


@pytest.fixture(scope="session")
def weird_root(tmp_path_factory) -> Path:
    """A folder whose path has spaces, quotes and a semicolon: every path must survive it."""
    path = tmp_path_factory.mktemp("data") / "with space 'quote\" ;semi"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def image_tree(weird_root) -> Path:
    return write_tree(weird_root / "images")


@pytest.fixture(scope="session")
def shard_dir(image_tree, weird_root) -> Path:
    """240 train and 70 val real photos in shards of 25 (uneven counts: the last shard holds 15)."""
    out = weird_root / "shards"
    convert.convert(image_tree, out, shard_samples=25)
    return out


@pytest.fixture(scope="session")
def free_port() -> int:
    return pick_port()


def slurm_unavailable() -> str | None:
    """Why tests/slurm/start.sh cannot bring up a Slurm on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "a real Slurm needs root here (tests/slurm/start.sh installs packages, edits /etc/hosts, runs munged)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm's daemons are not installed and apt-get is not there to install them"
    return None


def pytest_runtest_setup(item):
    """Tests marked `slurm` skip, naming the reason, where a real Slurm cannot start; where it can (CI runs
    as root), they run, and a Slurm that fails to start fails them."""
    if item.get_closest_marker("slurm"):
        reason = slurm_unavailable()
        if reason:
            pytest.skip(reason)
