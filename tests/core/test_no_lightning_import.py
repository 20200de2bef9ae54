"""Tests that the torch-only core stays importable without Lightning (a plain PyTorch loop can use it)."""
from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import lightning_introspect.core
import lightning_introspect.core.introspector
import lightning_introspect
print(json.dumps(sorted(sys.modules)))
"""


def test_core_imports_no_lightning_nor_tensorboard() -> None:
    """Test that importing lightning_introspect.core (and the package) loads no Lightning or TensorBoard module."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "lightning_introspect.core.introspector" in modules
    banned = ("lightning", "pytorch_lightning", "lightning_fabric", "tensorboard")
    loaded = [m for m in modules if m.split(".")[0] in banned]
    assert not loaded, f"importing the core loaded {loaded[:5]}"
