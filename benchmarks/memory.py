"""Per-example memory and time of the per-sample store at scale: 10 million ids, a few epochs.

Drives :class:`~lightning_introspect.core.samples.PerSampleStore` directly (no model): every epoch visits
every id once in a shuffled order, in large batches of synthetic (B, C) logits and targets; the per-example
figures come from the same kernel the callback uses (:func:`classification_figures_with_other`); each epoch
ends with :meth:`~PerSampleStore.fold_epoch`, then :meth:`~PerSampleStore.records` (the host copy an epoch end
makes) and, with ``--write``, the atomic ``samples.npz`` write the background writer does.

Reported: the store's tensor bytes per example (epoch buffers + aggregates), the resident-memory (RSS)
increase per example after allocation, after the epochs, and at the peak (VmHWM, which includes the
temporaries of ``fold_epoch``), and the time per epoch. Target: <= 64 bytes per example.

    python benchmarks/memory.py [--n 10000000] [--epochs 3] [--batch 65536] [--classes 10] [--write]
        [--markdown benchmarks/RESULTS_memory.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_introspect.core.samples import PerSampleStore, classification_figures_with_other
from lightning_introspect.records import write_records

TARGET_BYTES = 64
READING = """Reading:

- The store's tensors are 49 B per example: 20 B of this epoch's sums (count, loss, margin, confidence,
  correctness as float32) and 29 B of aggregates across epochs (see `core/samples.py`), within the 64 B target.
- Resident memory settles at the same figure once freed temporaries are handed back (`malloc_trim`); without
  that, glibc keeps some of them (the "after N epochs" line).
- The peak is transient, at the epoch end: `fold_epoch` builds the epoch means, an (N, 4) float32 tensor, plus
  masked copies, and `records()` copies the 29 B of aggregates for the writer thread. Folding in chunks of ids
  would bound that peak if it ever matters.
- Time per example is the figure kernel (log-softmax, top-2 on the logits; the loss the model computes anyway
  costs as much) plus the scatter into the store; on a GPU both are a few small kernels per step.
"""
POOL = 8  # distinct synthetic batches of logits, reused (the RNG is not what is measured)


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def trim_heap() -> int | None:
    """Returns freed heap pages to the OS (glibc ``malloc_trim``) and gives the RSS after it, or None."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return proc_status()["VmRSS"]


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="number of example ids")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="also time the atomic samples.npz write per epoch")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n, b, c = args.n, args.batch, args.classes
    logits_pool = torch.randn(POOL, b, c, generator=gen) * 3
    targets_pool = torch.randint(0, c, (POOL, b), generator=gen)
    perm = torch.zeros(n, dtype=torch.long)  # written now, so that its pages are in the baseline
    base = proc_status()["VmRSS"]

    t0 = time.perf_counter()
    store = PerSampleStore(n)
    alloc_s = time.perf_counter() - t0
    after_alloc = proc_status()["VmRSS"]
    reset_peak()
    epoch_bytes = store.epoch.element_size() * store.epoch.shape[1] + store.epoch_other.element_size()
    lines = [
        f"PerSampleStore, N = {n:,} ids, {args.epochs} epochs, batch {b:,}, {c} classes, CPU, 1 thread "
        f"(torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()})",
        f"store tensors: {store.bytes_per_example():.1f} B/example (epoch buffers {epoch_bytes} B + aggregates "
        f"{store.bytes_per_example() - epoch_bytes:.1f} B); target <= {TARGET_BYTES}",
        f"allocation: {alloc_s:.2f} s; RSS +{(after_alloc - base) / n:.1f} B/example "
        "(zero pages count once written: see after the epochs)",
    ]
    epoch_times, fig_times, fold_times, rec_times, write_times = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(args.epochs):
            torch.randperm(n, generator=gen, out=perm)
            t0 = time.perf_counter()
            fig_s = 0.0
            for k, s in enumerate(range(0, n, b)):
                ids = perm[s : s + b]
                logits, targets = logits_pool[k % POOL, : len(ids)], targets_pool[k % POOL, : len(ids)]
                tf = time.perf_counter()
                loss, margin, conf, correct, valid, other = classification_figures_with_other(logits, targets)
                fig_s += time.perf_counter() - tf
                store.observe(ids, loss, margin, conf, correct, labels=targets, valid=valid, other=other)
            t1 = time.perf_counter()
            store.fold_epoch(epoch)
            t2 = time.perf_counter()
            records = store.records()
            t3 = time.perf_counter()
            if args.write:
                write_records(tmp, records, {"format": 1, "epoch": epoch, "num_examples": n, "num_classes": c,
                                             "class_names": None, "task": "classification", "ignore_index": -100})
            t4 = time.perf_counter()
            epoch_times.append(t3 - t0)
            fig_times.append(fig_s)
            fold_times.append(t2 - t1)
            rec_times.append(t3 - t2)
            write_times.append(t4 - t3)
            del records
    st = proc_status()
    trimmed = trim_heap()
    bad = store.take_bad_counts()
    check = store.records()
    if int(bad.sum()) != 0 or not (check["seen_epochs"] == args.epochs).all():
        raise RuntimeError(f"the benchmark fed bad input (bad counts {bad.tolist()}) or missed ids")
    steps = -(-n // b)
    fig, obs = np.mean(fig_times), np.mean(epoch_times) - np.mean(fig_times) - np.mean(fold_times) - np.mean(rec_times)
    lines += [
        f"after {args.epochs} epochs: RSS +{(st['VmRSS'] - base) / n:.1f} B/example over the pre-store baseline; "
        f"peak (VmHWM) +{(st['VmHWM'] - base) / n:.1f} B/example (includes fold_epoch temporaries"
        + (" and the npz write" if args.write else "") + ")"
        + (f"; after malloc_trim (freed temporaries the allocator kept): RSS +{(trimmed - base) / n:.1f} B/example"
           if trimmed is not None else ""),
        f"time per epoch: {np.mean(epoch_times):.2f} s (min {min(epoch_times):.2f}) = {steps} batches x (figure "
        f"kernel {1e3 * fig / steps:.1f} ms + store.observe {1e3 * obs / steps:.1f} ms; {1e9 * (fig + obs) / n:.0f} "
        f"ns/example) + fold_epoch {np.mean(fold_times):.2f} s + records() {np.mean(rec_times) * 1e3:.0f} ms",
    ]
    if args.write:
        lines.append(f"samples.npz write (atomic, fsync): {np.mean(write_times):.2f} s per epoch")
    verdict = "PASS" if store.bytes_per_example() <= TARGET_BYTES else "FAIL"
    lines.append(f"{verdict}: {store.bytes_per_example():.1f} B/example of store tensors (target <= {TARGET_BYTES})")
    for line in lines:
        print(line)
    if args.markdown is not None:
        cmd = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = "# Per-example memory of the per-sample store\n\nCommand:\n\n```\n" + cmd.strip() + "\n```\n\n"
        text += "Output:\n\n```\n" + "\n".join(lines) + "\n```\n\n" + READING
        args.markdown.write_text(text)
    return lines


if __name__ == "__main__":
    main()
