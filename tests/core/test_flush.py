"""Tests of the flush pipeline's packed row (:class:`~lightning_introspect.core.flush.PackedLayout`): the pack
and the decode agree block by block, and a block that does not fit its place is refused, not misread."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_introspect.core.flush import PackedLayout
from lightning_introspect.core.samples import BAD_INPUT_NAMES
from lightning_introspect.core.stats import HIST_BINS


def _parts(layout: PackedLayout, rows: int) -> dict[str, torch.Tensor]:
    """Distinct values for every block: block b, row r, element i holds 1000 * b + 100 * r + i."""
    out = {}
    for b, (name, shape) in enumerate(layout.blocks):
        n = math.prod(shape)
        out[name] = (1000.0 * b + 100.0 * torch.arange(rows)[:, None] + torch.arange(n)[None, :]).reshape(rows, *shape)
    return out


@pytest.mark.parametrize("grad_sizes", [(), (3, 3, 3, 1), (3, 3, 3, 1, 5)])
def test_every_block_unpacks_to_what_was_packed(grad_sizes: tuple[int, ...]) -> None:
    """Test that each block of each row comes back from ``unpack`` in its shape with the values packed."""
    units = [4, 0, 7]
    layout = PackedLayout.of(units, list(grad_sizes))
    names = [n for n, _ in layout.blocks]
    assert names[:8] == ["sums", "mins", "fired", "hist", "dead", "counts", "extra", "interval"]
    assert dict(layout.blocks)["fired"] == (11,) and dict(layout.blocks)["hist"] == (3, HIST_BINS)
    assert dict(layout.blocks)["extra"] == (1 + len(BAD_INPUT_NAMES),)
    rows = 3
    parts = _parts(layout, rows)
    packed = layout.pack(parts, rows, torch.device("cpu"))
    assert packed.shape == (rows, layout.size) and packed.dtype == torch.float64
    for r in range(rows):
        got = layout.unpack(packed[r].numpy())
        assert list(got) == names
        for name, shape in layout.blocks:
            assert got[name].shape == shape
            np.testing.assert_array_equal(got[name], parts[name][r].reshape(shape).numpy())


def test_a_block_of_the_wrong_size_is_refused() -> None:
    """Test that packing a block whose size differs from its layout, or unpacking a row of another size, raises."""
    layout = PackedLayout.of([2, 2], [2, 2, 2, 1])
    parts = _parts(layout, 1)
    parts["fired"] = torch.zeros(1, 5)  # the layout has 4 units
    with pytest.raises(RuntimeError, match="'fired' has 5 values per row"):
        layout.pack(parts, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="does not fit"):
        layout.unpack(np.zeros(layout.size + 1))
