"""The package's layout rules, read from the source: imports (function-level ones included) form no cycle
and point one way, from the command lines through the launcher to training and data and down to the
config; nothing imports a command line; one module owns the manifest's path; modules stay small."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
# The programs users run: thin, and imported by nothing.
COMMAND_LINES = {"pipeline.submit", "pipeline.tune_buckets", "pipeline.rank", "pipeline.reproduce", "pipeline.requeue",
                 "pipeline.data.__main__", "pipeline.shards.__main__", "pipeline.scaling.__main__"}
# Layers, lowest first: a module imports only from lower layers, or from its own stage package.
LAYERS = [
    ("pipeline.config",),
    ("pipeline.dsconfig", "pipeline.signals", "pipeline.scaling"),
    ("pipeline.data",),
    ("pipeline.shards", "pipeline.train"),
    ("pipeline.launch",),
    ("pipeline.study",),
]
MAX_LINES = 350  # a module longer than this holds more than one job: split it


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under root (a package as its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that a file imports anywhere in it (module level, functions, classes)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; write the absolute pipeline.* name")
            base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def layer(module: str) -> int:
    """Index into LAYERS of a library module; command lines sit above every layer."""
    if module in COMMAND_LINES:
        return len(LAYERS)
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in tests/test_layout.py")


def stage(module: str) -> str:
    """The stage package of a module (pipeline.train for pipeline.train.loop), or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def violations(root: Path) -> list[str]:
    """Every broken import rule of the package at root, as sentences; [] when it follows them all."""
    names = module_names(root)
    graph = {name: imports(path, set(names)) - {name} for name, path in names.items()}
    problems = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in COMMAND_LINES:
                problems.append(f"{source} imports the command line {target}")
            elif stage(target) != stage(source) and layer(target) >= layer(source):
                problems.append(f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)}): "
                                "against the direction command lines -> launch -> train/shards -> data -> config")
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        stack.append(name)
        for target in sorted(graph[name]):
            if target in stack:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [])
    return problems


def test_imports_have_no_cycle_and_point_one_way():
    assert violations(PACKAGE) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pipeline" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pipeline"


@pytest.mark.parametrize("files, expected", [
    ({"config.py": "", "train/__init__.py": "", "train/loop.py": "from pipeline.launch import jobs\n",
      "launch/__init__.py": "", "launch/jobs.py": "def f():\n    from pipeline.train import loop\n"},
     ["import cycle: pipeline.launch.jobs -> pipeline.train.loop -> pipeline.launch.jobs",
      "pipeline.train.loop (layer 3) imports pipeline.launch.jobs (layer 4)"]),
    ({"config.py": "def f():\n    from pipeline.data import order\n", "data/__init__.py": "", "data/order.py": ""},
     ["pipeline.config (layer 0) imports pipeline.data.order (layer 2)"]),
    ({"config.py": "", "launch/__init__.py": "", "launch/prepare.py": "import pipeline.submit\n", "submit.py": ""},
     ["pipeline.launch.prepare imports the command line pipeline.submit"]),
    ({"config.py": "", "train/__init__.py": "", "train/loop.py": "from pipeline.shards import convert\n",
      "shards/__init__.py": "", "shards/convert.py": ""},
     ["pipeline.train.loop (layer 3) imports pipeline.shards.convert (layer 3)"]),
])
def test_the_rule_check_catches_a_cycle_an_upward_import_and_an_imported_command_line(tmp_path, files, expected):
    found = violations(write_package(tmp_path, files))
    for sentence in expected:
        assert any(problem.startswith(sentence) for problem in found), (sentence, found)


def test_no_module_is_over_the_size_rule():
    long = {name: len(path.read_text().splitlines()) for name, path in module_names(PACKAGE).items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}


def manifest_paths_built(path: Path) -> list[int]:
    """Lines of a file that build a manifest's path: `x / "train.json"`, `x / f"{split}.json"`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in ("train.json", "val.json"):
                lines.append(node.lineno)
            elif isinstance(right, ast.JoinedStr) and ast.unparse(right) == "f'{split}.json'":
                lines.append(node.lineno)
    return lines


def test_only_the_manifest_module_knows_where_a_manifest_lives():
    owner = PACKAGE / "data" / "manifest.py"
    assert manifest_paths_built(owner)
    others = {str(path.relative_to(PACKAGE)): manifest_paths_built(path) for path in PACKAGE.rglob("*.py")
              if path != owner}
    assert {name: lines for name, lines in others.items() if lines} == {}


def python(script: str) -> str:
    """The last line a child Python prints."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_launcher_imports_neither_deepspeed_nor_pyplot():
    """The launcher runs on a login node: DeepSpeed is slow to import and prints as it does."""
    assert python("import sys\nimport pipeline.submit, pipeline.tune_buckets\n"
                  "print(sorted(m for m in ('deepspeed', 'matplotlib.pyplot') if m in sys.modules))") == "[]"


def test_importing_a_module_changes_no_global_state():
    """Warning filters and matplotlib's backend are the program's to set, not an import's (the libraries
    we use set their own filters as they load: they are loaded first)."""
    script = (
        "import importlib, sys, warnings\n"
        "import deepspeed, matplotlib, numpy, PIL.Image, submitit, torch, torchvision, webdataset\n"
        "before, backend = list(warnings.filters), matplotlib.rcParams._get('backend')\n"
        f"for name in {sorted(module_names(PACKAGE))!r}:\n"
        "    importlib.import_module(name)\n"
        "print(list(warnings.filters) == before, matplotlib.rcParams._get('backend') == backend)\n"
    )
    assert python(script) == "True True"


def test_slurm_tests_skip_with_the_reason_for_a_user_who_cannot_start_slurm(tmp_path):
    """Plain pytest as a contributor (not root): the Slurm tests skip and say why, instead of failing. The
    child pytest is told it runs as uid 65534 (a plugin replaces os.geteuid): the interpreter of this
    environment may live where another user cannot execute it."""
    (tmp_path / "as_nobody.py").write_text("import os\nos.geteuid = lambda: 65534\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_slurm.py", "-p", "as_nobody", "-rs", "-q",
                             "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'pytest'}"],
                            capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" not in result.stdout and "failed" not in result.stdout
    assert "skipped" in result.stdout and "a real Slurm needs root here" in result.stdout
