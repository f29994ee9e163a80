"""The run manifest: what a run computes (its configuration fingerprint) and how far it got.

``manifest.json`` in the output folder records the configuration (model and its weights digest,
checkpoint, data set and its file list digest, preprocessing, analyses and their settings, dtype,
device type, batch size, number of images) and the finished batches. A rerun with the same
configuration resumes; a rerun with another one is refused with :class:`ConfigMismatchError`
naming every difference, since mixing the two would silently corrupt the results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

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
        inputs = any(d.startswith("data.") for d in diffs)
        what = (
            "were computed on other inputs (the data set's images, labels or masks differ)"
            if inputs
            else "come from a run with another configuration"
        )
        raise ConfigMismatchError(
            f"the results in {out_dir} {what}:\n  {shown}\nResuming would mix or reuse them. "
            "Rerun with --overwrite (overwrite=True) or another --out."
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


#: the packages whose versions a run records (the numbers depend on them)
RECORDED_PACKAGES = ("vit-embedding-lens", "torch", "timm", "transformer-lens", "numpy")


def package_versions(names: Sequence[str] = RECORDED_PACKAGES) -> Dict[str, Optional[str]]:
    """The installed version of each package, None for one that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Optional[Path] = None, timeout: float = 2.0) -> Optional[str]:
    """The commit of the git checkout the package runs from (``git rev-parse HEAD``), ``-dirty``
    appended when tracked files are modified; None when it is not a checkout, git is missing or
    slow."""
    import subprocess

    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    if not (where / ".git").exists():  # an installed wheel: no checkout to name
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if status else head or None


_COMMAND_LINE: List[Optional[str]] = [None]


@contextlib.contextmanager
def recorded_command_line(command: Optional[str]) -> Iterator[None]:
    """Record ``command`` as the run's command line inside the block (``vit-lens`` called in-process
    with its arguments, e.g. ``main([...])``, is not the interpreter's command line); None keeps
    the interpreter's."""
    _COMMAND_LINE.append(command)
    try:
        yield
    finally:
        _COMMAND_LINE.pop()


def command_line() -> str:
    """The command that started the run: the innermost :func:`recorded_command_line`, else the
    interpreter's own (``python -m ...`` included, so it can be run again)."""
    import shlex
    import sys

    recorded = _COMMAND_LINE[-1]
    return recorded if recorded is not None else shlex.join(getattr(sys, "orig_argv", sys.argv))


def run_environment() -> Dict[str, Any]:
    """What ran a run, for the manifest and the report (never part of the fingerprint): package
    versions, Python, the git commit of the package's checkout (or None) and the command line."""
    import platform

    return {
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "git_commit": git_commit(),
        "command_line": command_line(),
    }


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
