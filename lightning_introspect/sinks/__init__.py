"""Where recorded figures go: the Sink protocol, the background writer, TensorBoard."""
from .base import AsyncWriter, Sink
from .tensorboard import TensorBoardSink

__all__ = ["AsyncWriter", "Sink", "TensorBoardSink"]
