"""Read real TensorBoard event files back with tensorboard's own ``EventAccumulator`` (keeping every event)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

#: 0 = keep all events of each kind (the default keeps a 10k/500/... reservoir sample).
KEEP_ALL = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0, "audio": 0}
#: Tag under which ``SummaryWriter.add_custom_scalars`` stores the layout.
LAYOUT_TAG = "custom_scalars__config__"
_TEXT_SUFFIX = "/text_summary"


@dataclass
class Events:
    """What one log directory's event files hold, by kind; each list is ``(step, value)`` in write order."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)  # value: HistogramValue
    images: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)  # value: ImageEvent
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # tag without "/text_summary"
    tensors: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)  # other tensor summaries
    layout: Optional[layout_pb2.Layout] = None

    def tags(self) -> set[str]:
        """Every tag written, of any kind, except the custom-scalars layout."""
        return {*self.scalars, *self.histograms, *self.images, *self.texts, *self.tensors}

    def steps(self, tag: str) -> list[int]:
        """Steps at which ``tag`` was written (scalars, histograms, images or text)."""
        for kind in (self.scalars, self.histograms, self.images, self.texts, self.tensors):
            if tag in kind:
                return [s for s, _ in kind[tag]]
        return []


def read_events(logdir: Union[str, Path]) -> Events:
    """Every event in the event files directly inside ``logdir`` (not its subfolders).

    Close or flush the writer first: events still buffered in a ``SummaryWriter`` are not on disk yet.
    """
    acc = EventAccumulator(str(logdir), size_guidance=KEEP_ALL)
    acc.Reload()
    tags = acc.Tags()
    out = Events()
    for tag in tags.get("scalars", []):
        out.scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in tags.get("histograms", []):
        out.histograms[tag] = [(e.step, e.histogram_value) for e in acc.Histograms(tag)]
    for tag in tags.get("images", []):
        out.images[tag] = [(e.step, e) for e in acc.Images(tag)]
    for tag in tags.get("tensors", []):
        events = acc.Tensors(tag)
        if tag == LAYOUT_TAG:
            out.layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(events[-1].tensor_proto).item())
        elif tag.endswith(_TEXT_SUFFIX):
            out.texts[tag[: -len(_TEXT_SUFFIX)]] = [(e.step, _text(e.tensor_proto)) for e in events]
        else:
            out.tensors[tag] = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    return out


def _text(proto: Any) -> str:
    value = tensor_util.make_ndarray(proto)
    items = value.reshape(-1).tolist() if value.ndim else [value.item()]
    return "\n".join(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items)


def event_files(logdir: Union[str, Path]) -> list[Path]:
    """Event files directly inside ``logdir``."""
    return sorted(Path(logdir).glob("events.out.tfevents.*"))
