"""The Sink protocol and the background writer, re-exported from the core, which declares and drives them."""
from __future__ import annotations

from ..core.contracts import Sink
from ..core.writer import AsyncWriter

__all__ = ["AsyncWriter", "Sink"]
