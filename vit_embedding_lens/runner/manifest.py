"""The run manifest: what a run computes (its configuration fingerprint) and how far it got.

``manifest.json`` in the output folder records the configuration (model and its weights digest,
checkpoint, data set and its file list digest, preprocessing, analyses and their settings, dtype,
device type, batch size, number of images) and the finished batches. A rerun with the same
configuration resumes; a rerun with another one is refused with :class:`ConfigMismatchError`
naming every difference, since mixing the two would silently corrupt the results.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from vit_embedding_lens.runner.storage import atomic_write_json

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class ConfigMismatchError(ValueError):
    """The output folder holds a run with another configuration."""


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples become lists, paths strings), for exact comparison."""
    return json.loads(json.dumps(obj, default=str))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's parameter and buffer names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # the array itself (buffer protocol), not a bytes copy of every weight: same digest
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    """Readable ``key: old -> new`` lines for every leaf that differs between two JSON values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{where}: {old[key]!r} -> (absent)")
            elif key not in old:
                out.append(f"{where}: (absent) -> {new[key]!r}")
            else:
                out += differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix or '(config)'}: {old!r} -> {new!r}"]


def check_same_config(
    existing: Mapping[str, Any], config: Mapping[str, Any], out_dir: Path
) -> None:
    diffs = differences(to_json(existing), to_json(config))
    if diffs:
        shown = "\n  ".join(diffs[:20])
        raise ConfigMismatchError(
            f"{out_dir} holds results of a run with another configuration:\n  {shown}\nResuming "
            "would mix the two. Write to a new output folder, or start over with --overwrite "
            "(overwrite=True)."
        )


def read_manifest(out_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); start over with --overwrite") from err
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {manifest.get('format')}, expected {FORMAT_VERSION}; use "
            "--overwrite"
        )
    return manifest


def new_manifest(config: Mapping[str, Any], n_batches: int) -> Dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {
        "format": FORMAT_VERSION,
        "config": to_json(config),
        "n_batches": n_batches,
        "finished_batches": [],
        "status": "running",
        "created": now,
        "updated": now,
    }


def write_manifest(out_dir: Path, manifest: Dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(Path(out_dir) / MANIFEST_FILE, manifest)
