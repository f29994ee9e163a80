"""Crash-safe files of a run: atomic writes, per-batch result files, and reading them back.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then moved over
its final name with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed: a run
killed at any instant leaves either the old file or the new one, never a partial one. Leftover
temporary files (``.*.tmp``) are removed when a run starts.

A batch file ``batches/batch_000042.npz`` holds, for batch 42 (data set items ``42*B .. 43*B-1``):
``meta/index``, ``meta/label``, ``meta/image_id``, ``meta/conversion`` of the images it ran on,
``meta/skipped_*`` for
the items that could not be loaded, and ``<analysis>/<key>`` per-image arrays. It is read with
``allow_pickle=False``: only plain numeric, boolean and string arrays are stored.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Optional

import numpy as np

BATCHES_DIR = "batches"
META = "meta"
_TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g.
    Windows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` atomically: ``write(f)`` into a temporary file, fsync, ``os.replace``, fsync
    dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    # numpy's stub types **kwds as if a key could be `allow_pickle` (a bool)
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def clean_temp_files(folder: Path) -> int:
    """Remove temporary files left by interrupted atomic writes under ``folder``; returns how
    many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.rglob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def batch_path(out_dir: Path, batch_id: int) -> Path:
    return Path(out_dir) / BATCHES_DIR / f"batch_{batch_id:06d}.npz"


def batch_ids_on_disk(out_dir: Path) -> List[int]:
    """Ids of the batch files present (complete by construction: they are written atomically)."""
    folder = Path(out_dir) / BATCHES_DIR
    if not folder.is_dir():
        return []
    ids = []
    for p in folder.glob("batch_*.npz"):
        try:
            ids.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(ids)


def check_array(value: Any, where: str, n: int) -> np.ndarray:
    """A per-image result as a storable array, or a TypeError/ValueError naming ``where``."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
            value = value.cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy array or tensor, got {type(value).__name__}")
    if value.dtype.kind not in "biufUS":
        raise TypeError(
            f"{where} has dtype {value.dtype}; only numeric, boolean and string arrays are stored"
        )
    if value.ndim == 0 or value.shape[0] != n:
        raise ValueError(
            f"{where} has shape {value.shape}; its first axis must be the batch ({n} images)"
        )
    return value


def write_batch(out_dir: Path, batch_id: int, arrays: Dict[str, np.ndarray]) -> Path:
    path = batch_path(out_dir, batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(path, arrays)
    return path


def read_batch(path: Path, keys: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """The arrays of a batch file (only ``keys`` when given); never unpickles."""
    with np.load(path, allow_pickle=False) as data:
        names = data.files if keys is None else [k for k in keys if k in data.files]
        return {k: data[k] for k in names}


def meta_arrays(indices, labels, image_ids, skipped, conversions=None) -> Dict[str, np.ndarray]:
    """The ``meta/*`` arrays of a batch file (``meta/conversion``: how each image was decoded when
    not plainly, ``""`` when plainly)."""
    conversions = list(conversions) if conversions is not None else [""] * len(list(indices))
    return {
        f"{META}/conversion": np.asarray(conversions, dtype=str),
        f"{META}/index": np.asarray(indices, dtype=np.int64),
        f"{META}/label": np.asarray(labels, dtype=np.int64),
        f"{META}/image_id": np.asarray(list(image_ids), dtype=str),
        f"{META}/skipped_index": np.asarray([s.index for s in skipped], dtype=np.int64),
        f"{META}/skipped_image_id": np.asarray([s.image_id for s in skipped], dtype=str),
        f"{META}/skipped_reason": np.asarray([s.reason for s in skipped], dtype=str),
    }
