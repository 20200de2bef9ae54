"""What ``pip install lightning-introspect`` gives: the README's code must run with what the wheel declares.

A truly clean virtualenv would download torch (GBs) on every CI run, so the check is split into two cheap
parts, which together cover what it would show short of resolving versions:

- the built wheel's ``Requires-Dist`` names a distribution for every third-party module that the README's
  Python blocks and the examples import, so ``pip install`` brings each one;
- the README's first code block runs against the *wheel's* files, installed with ``--no-deps`` into a folder
  of their own that comes first on ``sys.path`` (a venv with ``--system-site-packages`` would give the same,
  after seconds of ``ensurepip``), with torch and Lightning taken from this environment and an editable
  install's import hook removed: so the wheel ships every module the code uses.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Collection

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Import name -> distribution name, where they differ; other modules are their own distribution.
DISTRIBUTIONS = {
    "lightning": "lightning",
    "pytorch_lightning": "pytorch-lightning",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "google": "google-crc32c",
    "lightning_introspect": "lightning-introspect",
}


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def top_level_imports(source: str, local: Collection[str] = ()) -> set[str]:
    """Top-level names of the third-party modules ``source`` imports anywhere (functions included), less the
    standard library and ``local`` modules."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if not _is_stdlib(n) and n not in local and n != "__future__"}


def _is_stdlib(name: str) -> bool:
    """Whether ``name`` is a module of the standard library (``sys.stdlib_module_names`` from Python 3.10)."""
    if hasattr(sys, "stdlib_module_names"):
        return name in sys.stdlib_module_names
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return origin in ("built-in", "frozen") or (origin or "").startswith(sysconfig.get_paths()["stdlib"])


def requirement_name(requirement: str) -> str:
    """``'lightning>=2.1; extra == "x"'`` -> ``'lightning'`` (normalized as pip compares names)."""
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel from this tree, without its dependencies."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources: a build in the tree would reuse its stale build/ folder.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lightning_introspect", src / "lightning_introspect",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Offline with this environment's setuptools; where it has none (Python >= 3.12 venvs), pip fetches it.
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("lightning_introspect-*.whl")
    return built


def wheel_requirements(wheel: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The wheel's required distributions, and those of each extra."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(name).decode())
    base: set[str] = set()
    extras: dict[str, set[str]] = {}
    for req in meta.get_all("Requires-Dist") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        (extras.setdefault(extra.group(1), set()) if extra else base).add(requirement_name(req))
    return base, extras


def test_wheel_requires_every_package_the_readme_and_examples_import(wheel: Path) -> None:
    """Test that the wheel's metadata requires a distribution for each third-party import of the README's
    Python blocks (plain dependencies) and of the examples (dependencies plus the ``examples`` extra)."""
    base, extras = wheel_requirements(wheel)
    own = "lightning-introspect"

    def missing(modules: set[str], allowed: set[str]) -> set[str]:
        return {m for m in modules if requirement_name(DISTRIBUTIONS.get(m, m)) not in allowed | {own}}

    blocks = readme_python_blocks()
    assert blocks, "the README has no ```python block"
    readme_imports = set().union(*(top_level_imports(b) for b in blocks))
    assert "lightning" in readme_imports  # the README's first line: import lightning.pytorch as pl
    gaps = missing(readme_imports, base)
    assert not gaps, f"the README imports what `pip install` does not bring: {sorted(gaps)}"

    examples = sorted((ROOT / "examples").glob("*.py"))
    local = {p.stem for p in examples}
    for path in examples:
        imports = top_level_imports(path.read_text(encoding="utf-8"), local)
        gaps = missing(imports, base | extras.get("examples", set()))
        assert not gaps, f"{path.name} imports {sorted(gaps)}, in neither the dependencies nor the `examples` extra"


def test_readme_code_runs_from_the_built_wheel(wheel: Path, tmp_path: Path) -> None:
    """Test that the README's first code block, given a dataset and a model, runs a real ``fit`` and ranks
    suspects with the package imported from the wheel's files, not from the working tree."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    prelude = '''
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as _pl

class TinyClassifier(_pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
my_dataset = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
model = TinyClassifier()
'''
    check = '''
imported = {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "lightning_introspect"}
assert "lightning_introspect.core" in imported
assert all(f.startswith(SITE) for f in imported.values()), imported
assert len(suspects.ids) == 40 and sorted(suspects.ids.tolist()) == list(range(40)), suspects.ids
'''
    script = tmp_path / "readme_block.py"
    # An editable install of this package (`pip install -e`) adds an import hook that would serve any module
    # the wheel lacks from the working tree: it is removed, and where every module came from is checked.
    unhook = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not str(getattr(f, '__module__', '')).startswith('__editable__')]\n"
        f"SITE = {str(site)!r}\n"
    )
    script.write_text(unhook + prelude + readme_python_blocks()[0] + check, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (site / "bin" / "lightning-introspect").exists()  # the console script of [project.scripts]
