"""slurm/train.sbatch rendered from the config: golden text, valid bash, every path quoted."""

import shlex
import subprocess
from pathlib import Path

import pytest
from pipeline import config
from pipeline.launch import sbatch

GOLDEN = Path(__file__).parent / "golden" / "train_bs8k.sbatch"
RUN_DIR = Path("/scratch/runs/it's a \"run\"; rm -rf x")
WORKDIR = Path("/home/me/my project")


def render_8k(**kwargs):
    cfg = config.preset("goyal_r50_bs8k")
    options = {"partition": "gpu", "account": "vision", "exclusive": True, "requeue": True}
    return sbatch.render(cfg, RUN_DIR, 720, options, WORKDIR, python="/opt/venv 1/bin/python", **kwargs)


def srun_argv(text: str) -> list[str]:
    """The srun command of a rendered script, continuation lines joined, split as bash would, up to the
    redirection of srun's own stderr."""
    joined = text.replace("\\\n", " ")
    argv = shlex.split(next(line for line in joined.splitlines() if line.startswith("{ srun ")))
    return argv[1:argv.index("2>&1")]


def test_matches_golden_file():
    assert render_8k() == GOLDEN.read_text()


def test_is_valid_bash_and_srun_gets_the_exact_paths(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_8k())
    subprocess.run(["bash", "-n", str(script)], check=True)
    argv = srun_argv(render_8k())
    assert argv[-1] == str(RUN_DIR)
    assert argv[argv.index("-u") - 1] == "/opt/venv 1/bin/python"
    assert f"--output={RUN_DIR}/slurm/%j_%t.log" in argv


def test_cpu_jobs_ask_for_no_gpus():
    cfg = config.preset("demo")
    text = sbatch.render(cfg, Path("/r"), 10, {}, Path("/w"), python="python")
    assert "--gpus-per-node" not in text and "--ntasks-per-node=2" in text


def test_unquotable_directive_values_are_refused():
    with pytest.raises(ValueError, match="cannot go on an #SBATCH line"):
        sbatch.render(config.preset("demo"), Path("/r"), 10, {"partition": "gpu partition"}, Path("/w"))
