"""A C checksum for TensorBoard's event files.

Without TensorFlow, TensorBoard's record writer computes the masked CRC32C of every record byte by byte in
Python: about 0.15 ms per KB on a laptop core, holding the GIL on the writer thread, so that the training
thread waits for it. ``google-crc32c`` computes the same checksum in C (hardware CRC instructions where
the CPU has them) in about a microsecond per KB. :func:`use_fast_crc` points the record writer at it,
once, after checking that both give the same checksums, so the bytes written do not change.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _masked(crc: int) -> int:
    """TFRecord's mask of a CRC32C (rotate right by 15, add a constant)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def use_fast_crc() -> bool:
    """Makes TensorBoard's record writer checksum in C; True when it does. Idempotent and thread-safe; a
    no-op (False) when ``google-crc32c`` or its C extension is missing, when TensorBoard's writer module
    is not where this expects it, or when ``LIGHTNING_INTROSPECT_FAST_CRC=0``."""
    with _lock:
        if "done" in _state:
            return _state["done"]
        _state["done"] = False
        if os.environ.get("LIGHTNING_INTROSPECT_FAST_CRC", "1") == "0":
            return False
        try:
            import google_crc32c
            from tensorboard.summary.writer import record_writer
        except ImportError:
            return False
        slow = getattr(record_writer, "masked_crc32c", None)
        if getattr(google_crc32c, "implementation", "") != "c" or slow is None:
            return False

        def masked_crc32c(data: bytes) -> int:
            return _masked(google_crc32c.value(bytes(data)))

        probes = [b"", b"\x00" * 8, b"lightning_introspect", os.urandom(257)]
        if any(masked_crc32c(p) != slow(p) for p in probes):
            log.warning("google-crc32c disagrees with TensorBoard's checksum; keeping TensorBoard's own.")
            return False
        record_writer.masked_crc32c = masked_crc32c
        _state["done"] = True
        return True
