"""One writer per run folder: a lock file holding the writer's pid, host and a token (and the
error for a file in the folder that the runner did not write, :class:`ForeignFileError`).

A run takes ``OUT/.vit-lens.lock`` before it touches the folder (created with ``O_EXCL``, so of two
runs starting at once one wins) and removes it when it is done. A second run finds the lock and is
refused with :class:`RunFolderLockedError`, which names the holder. A lock whose process is gone
(same host, pid not alive) is stale: it is taken over with a warning. A lock from another host
cannot be checked and is refused; delete the file by hand when no run is active.

Under ``torchrun`` the ranks of one launch share the lock: rank 0 takes it and broadcasts its
token, every other rank checks that the file holds that token (it also proves the folder is
shared). Before writing each batch file every rank checks the token again (:func:`check_lock`), so
ranks that outlive a killed launcher stop as soon as a new run has taken the folder over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from vit_embedding_lens.errors import RunFolderLockedError

__all__ = ["ForeignFileError", "RunFolderLockedError", "LOCK_FILE"]

LOCK_FILE = ".vit-lens.lock"


class ForeignFileError(ValueError):
    """The output folder holds a file the runner would write but did not write (e.g. a user's own
    ``results.npz``); the runner never overwrites or deletes such a file."""


def lock_path(out_dir: Path) -> Path:
    return Path(out_dir) / LOCK_FILE


def read_lock(out_dir: Path) -> Optional[Dict[str, Any]]:
    """The lock's content, None when there is no lock; an unreadable lock reads as ``{}``."""
    try:
        text = lock_path(out_dir).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def _describe(lock: Dict[str, Any]) -> str:
    return (
        f"pid {lock.get('pid', '?')} on {lock.get('host', '?')} (since {lock.get('started', '?')})"
    )


def acquire_lock(out_dir: Path, world_size: int = 1) -> str:
    """Take the folder's lock; returns its token. Raises :class:`RunFolderLockedError` when a live
    (or uncheckable) run holds it; takes a stale one over with a warning."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(out_dir)
    token = uuid.uuid4().hex
    content = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "token": token,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": int(world_size),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(out_dir)
            if holder is None:  # released meanwhile
                continue
            _take_over_if_stale(out_dir, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        if (read_lock(out_dir) or {}).get("token") == token:
            return token
    raise RunFolderLockedError(
        f"could not take the lock {path}: other runs keep taking it; run one at a time"
    )


def _take_over_if_stale(out_dir: Path, holder: Dict[str, Any]) -> None:
    path = lock_path(out_dir)
    pid, host = holder.get("pid"), holder.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        warnings.warn(
            f"taking over the stale lock {path} of {_describe(holder)}: that process is gone",
            UserWarning,
            stacklevel=4,
        )
        path.unlink(missing_ok=True)
        return
    where = "" if host == socket.gethostname() else " (another host: it cannot be checked)"
    raise RunFolderLockedError(
        f"{out_dir} is being written by another run: {_describe(holder)}{where}. Wait for it, or "
        f"use another --out; if no run is active, delete {path}"
    )


def check_lock(out_dir: Path, token: str) -> None:
    """Raise :class:`RunFolderLockedError` unless the folder's lock still holds ``token``."""
    holder = read_lock(out_dir)
    if holder is None or holder.get("token") != token:
        who = "nobody" if holder is None else _describe(holder)
        raise RunFolderLockedError(
            f"another run took over {out_dir} (its lock is now held by {who}); this run stops "
            "without writing more"
        )


def release_lock(out_dir: Path, token: str) -> None:
    """Remove the lock if it still holds ``token`` (never another run's)."""
    holder = read_lock(out_dir)
    if holder is not None and holder.get("token") == token:
        lock_path(out_dir).unlink(missing_ok=True)
