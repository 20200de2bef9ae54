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


_ONE_PACKAGE = """
import json, sys, tempfile
import torch
import lightning.pytorch as L
from lightning_introspect import Introspect
only_one = "pytorch_lightning" not in sys.modules and "lightning_fabric" not in sys.modules
import pytorch_lightning as PL  # a second package, imported after the callback's class was made

class Module(PL.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

g = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
root = tempfile.mkdtemp()
logger = PL.loggers.TensorBoardLogger(root, name="run")
trainer = PL.Trainer(max_steps=6, callbacks=[Introspect(every_n_steps=2, warmup_steps=0)], logger=logger,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
print(json.dumps({"only_one": only_one, "log_dir": logger.log_dir}))
"""


def test_callback_uses_only_the_lightning_package_imported_and_still_serves_the_other(tmp_path) -> None:
    """Test that after ``import lightning.pytorch`` the callback does not import ``pytorch_lightning`` (a second
    copy of Lightning), and that a ``pytorch_lightning.Trainer`` made later still runs it and its
    TensorBoardLogger is recognised (the event file lands in the logger's own log dir)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = subprocess.run([sys.executable, "-c", _ONE_PACKAGE], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["only_one"], "importing Introspect after lightning.pytorch also imported pytorch_lightning"
    acc = EventAccumulator(result["log_dir"], size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.startswith("grad_norm/") for t in tags), tags[:10]
