"""What ``pip install lightning-introspect`` gives: the README's code must run with what the wheel declares.

A truly clean virtualenv would have to download torch (GBs) on every CI run, so the check is split into two
cheap parts that together say the same thing:

- the built wheel's ``Requires-Dist`` names a distribution for every third-party module that the README's
  Python blocks and the examples import (pip installs exactly those, so nothing the code needs is missing);
- the README's first code block runs against the *wheel's* files (installed with ``--no-deps`` into a folder
  of its own, put first on ``sys.path``, the working tree out of reach), with torch and Lightning taken from
  this environment: so the wheel ships every module and file the code uses.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

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


def top_level_imports(source: str, local: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """Top-level names of the third-party modules ``source`` imports anywhere (functions included), less the
    standard library and ``local`` modules."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local and n != "__future__"}


def requirement_name(requirement: str) -> str:
    """``'lightning>=2.1; extra == "x"'`` -> ``'lightning'`` (normalized as pip compares names)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel from this tree (no dependencies fetched, setuptools of this environment)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(ROOT)],
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
    assert not missing(readme_imports, base), f"the README imports what `pip install` does not bring: {missing(readme_imports, base)}"

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
import lightning_introspect
assert lightning_introspect.__file__.startswith(SITE), lightning_introspect.__file__
assert len(suspects.ids) == 40 and sorted(suspects.ids.tolist()) == list(range(40)), suspects.ids
'''
    script = tmp_path / "readme_block.py"
    script.write_text(f"SITE = {str(site)!r}\n" + prelude + readme_python_blocks()[0] + check, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (site / "bin" / "lightning-introspect").exists()  # the console script of [project.scripts]
