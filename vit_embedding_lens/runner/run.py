"""run_analyses: stream a data set through analyses, one crash-safe file per batch, resumable.

Batch ``b`` is always items ``b*B .. (b+1)*B-1`` of the data set, whatever the number of processes,
so a batch computes the same numbers in any run, a killed run resumes with the batches it lacks,
and under ``torchrun`` the ranks share the pending batches (rank ``r`` takes every ``world``-th) and
may even differ in number from the interrupted run. Only per-image results are ever kept, on disk;
images stream through a DataLoader.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vit_embedding_lens.runner import distributed
from vit_embedding_lens.runner.analysis import (
    Analysis,
    build_analyses,
    check_analysis,
    hook_names_of,
)
from vit_embedding_lens.runner.batch import Batch, SharedForward, collate
from vit_embedding_lens.runner.lock import (
    ForeignFileError,
    RunFolderLockedError,
    acquire_lock,
    check_lock,
    read_lock,
    release_lock,
)
from vit_embedding_lens.runner.manifest import (
    MANIFEST_FILE,
    ConfigMismatchError,
    check_same_config,
    new_manifest,
    read_manifest,
    run_environment,
    to_json,
    weights_digest,
    write_manifest,
)
from vit_embedding_lens.runner.results import META_KEYS, RunResults, load_results
from vit_embedding_lens.runner.storage import (
    BATCHES_DIR,
    META,
    atomic_write_json,
    atomic_write_npz,
    batch_ids_on_disk,
    batch_path,
    check_array,
    clean_temp_files,
    meta_arrays,
    read_batch,
    write_batch,
)

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

PROGRESS_DIR = "progress"
#: skipped and converted images listed in the manifest (all are counted)
MAX_LISTED = 1000
MERGED_FILE = "results.npz"
_BATCH_NAME = re.compile(r"^batch_\d{6,}\.npz$")


class UnusableImageWarning(UserWarning):
    """An image was skipped (unreadable, or its mask does not fit); the run goes on."""


def run_analyses(
    model: HookedViT,
    dataset: Any,
    analyses: Union[Sequence[Union[str, Analysis]], None],
    out_dir: Union[str, Path],
    batch_size: int = 32,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    run_config: Optional[Mapping[str, Any]] = None,
) -> Optional[RunResults]:
    """Run ``analyses`` over ``dataset`` and store per-image results in ``out_dir``; resumable.

    ``dataset`` yields :class:`~vit_embedding_lens.data.images.Sample` items (or ``SkippedImage``)
    and has ``fingerprint()``; ``analyses`` are registered names or Analysis objects (None: all
    registered). Images go to the model's device and dtype. ``run_config`` adds entries to the
    configuration fingerprint (the CLI records the model name, checkpoint and data folder).

    With ``resume`` (default) a folder holding the same configuration continues where it stopped;
    another configuration raises :class:`ConfigMismatchError` unless ``overwrite`` starts over.
    Under ``torchrun`` (an initialized process group) the ranks share the batches and rank 0 merges.
    Returns the merged :class:`RunResults` on rank 0, None on the other ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    analyses = _resolve_analyses(analyses)
    ctx = distributed.current()
    out_dir = Path(out_dir)
    device, dtype = _model_device_dtype(model)
    config = run_fingerprint(model, dataset, analyses, batch_size, dtype, device, run_config)
    n_images = len(dataset)
    n_batches = math.ceil(n_images / batch_size)

    if ctx.active:
        pending, token = _prepare_on_rank0(
            ctx, out_dir, config, n_batches, batch_size, n_images, resume, overwrite
        )
    else:
        token = acquire_lock(out_dir)
        try:
            pending = _prepare(out_dir, config, n_batches, batch_size, n_images, resume, overwrite)
        except BaseException:
            release_lock(out_dir, token)
            raise
    try:
        if ctx.active:
            _check_shared_folder(ctx, out_dir, token)
        mine = pending[ctx.rank :: ctx.world_size]
        _process(
            model,
            dataset,
            analyses,
            out_dir,
            mine,
            batch_size,
            n_images,
            device,
            dtype,
            progress and ctx.is_main,
            num_workers,
            ctx,
            token,
        )
        ctx.barrier()
        if not ctx.is_main:
            return None
        return _finish(out_dir)
    finally:
        if ctx.is_main:  # rank 0 took the lock for the launch; only it releases it
            release_lock(out_dir, token)


def run_fingerprint(
    model: HookedViT,
    dataset: Any,
    analyses: Sequence[Analysis],
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    run_config: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The configuration a run's results depend on (compared on resume)."""
    fingerprint = getattr(dataset, "fingerprint", None)
    if not callable(fingerprint):
        raise TypeError(
            f"the data set {type(dataset).__name__} needs a fingerprint() method (what identifies "
            "its content)"
        )
    return {
        **dict(run_config or {}),
        "model": model.cfg.model_name,
        "weights_sha256": weights_digest(model),
        "data": fingerprint(),
        "analyses": {a.name: dict(a.config()) for a in analyses},
        "dtype": str(dtype).replace("torch.", ""),
        "device_type": device.type,
        "batch_size": int(batch_size),
        "n_images": len(dataset),
    }


def _resolve_analyses(analyses: Union[Sequence[Union[str, Analysis]], None]) -> List[Analysis]:
    if analyses is None:
        return build_analyses(None)
    if isinstance(analyses, str):
        analyses = [a for a in analyses.split(",")]
    names = [a for a in analyses if isinstance(a, str)]
    built = iter(build_analyses(names)) if names else iter(())
    out = []
    for a in analyses:
        obj = next(built) if isinstance(a, str) else a
        check_analysis(obj)
        out.append(obj)
    if len({a.name for a in out}) != len(out):
        raise ValueError(f"two analyses share a name: {[a.name for a in out]}")
    return out


def _model_device_dtype(model: HookedViT) -> tuple:
    param = next(model.parameters())
    return param.device, param.dtype


def _batch_items(batch_id: int, batch_size: int, n_images: int) -> List[int]:
    return list(range(batch_id * batch_size, min((batch_id + 1) * batch_size, n_images)))


def remove_run(out_dir: Path) -> None:
    """Delete what a previous run wrote in ``out_dir``, and nothing else: the files its manifest
    lists (the merged file, the report's files), its batch and progress files (by their names),
    and the manifest; folders only when that leaves them empty."""
    try:
        manifest = read_manifest(out_dir)
    except ValueError:  # unreadable: only files named as the runner names them
        manifest = None
    listed: List[str] = []
    if manifest is not None:
        listed += list(manifest.get("files", [MERGED_FILE]))
        listed += list(manifest.get("report", {}).get("files", []))
    root = out_dir.resolve()
    for name in listed:
        path = (out_dir / name).resolve()
        if root in path.parents and path.is_file():
            path.unlink()
    for path in (out_dir / BATCHES_DIR).glob("batch_*.npz"):
        if _BATCH_NAME.match(path.name):
            path.unlink()
    for path in (out_dir / PROGRESS_DIR).glob("rank*.json"):
        path.unlink()
    clean_temp_files(out_dir)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for folder in ("report/tables", "report/figures", "report", BATCHES_DIR, PROGRESS_DIR):
        try:
            (out_dir / folder).rmdir()  # only when empty
        except OSError:
            pass


def _remove_progress(out_dir: Path) -> None:
    """Remove the ranks' progress files (and their folder when that empties it)."""
    for path in (out_dir / PROGRESS_DIR).glob("rank*.json"):
        path.unlink(missing_ok=True)
    try:
        (out_dir / PROGRESS_DIR).rmdir()
    except OSError:
        pass


def _check_foreign_files(out_dir: Path, manifest: Optional[Dict[str, Any]]) -> None:
    """Refuse to start when a file the runner would write exists but the runner did not write it
    (a user's own ``results.npz``): the runner never overwrites or deletes such a file."""
    ours = set(manifest.get("files", [MERGED_FILE])) if manifest is not None else set()
    if (out_dir / MERGED_FILE).exists() and MERGED_FILE not in ours:
        raise ForeignFileError(
            f"{out_dir / MERGED_FILE} was not written by vit-lens (no run manifest lists it); "
            "the runner never overwrites it: move it, or use another --out"
        )


def _prepare(
    out_dir: Path,
    config: Dict[str, Any],
    n_batches: int,
    batch_size: int,
    n_images: int,
    resume: bool,
    overwrite: bool,
    world_size: int = 1,
) -> List[int]:
    """Rank 0: check or create the folder's manifest; return the batches still to compute."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_run(out_dir)
    manifest = read_manifest(out_dir)
    _check_foreign_files(out_dir, manifest)
    if manifest is None and batch_ids_on_disk(out_dir):
        raise ValueError(
            f"{out_dir} has batch files but no {MANIFEST_FILE}; start over with --overwrite"
        )
    if manifest is not None:
        if not resume:
            raise ValueError(
                f"{out_dir} already holds a run; resume it (resume=True) or start over with "
                "--overwrite"
            )
        check_same_config(manifest["config"], config, out_dir)
    else:
        manifest = new_manifest(config, n_batches)
    clean_temp_files(out_dir)
    (out_dir / MERGED_FILE).unlink(missing_ok=True)
    _remove_progress(out_dir)  # the batch files are the record
    finished = []
    for b in batch_ids_on_disk(out_dir):
        if b < n_batches and _batch_is_valid(out_dir, b, batch_size, n_images):
            finished.append(b)
        else:  # cannot happen with atomic writes unless files were edited by hand
            warnings.warn(
                f"{batch_path(out_dir, b)} does not hold batch {b} of this run; recomputing it",
                stacklevel=3,
            )
            batch_path(out_dir, b).unlink()
    done = set(finished)
    pending = [b for b in range(n_batches) if b not in done]
    environment = run_environment()
    attempt = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "world_size": world_size,
        "pending_batches": len(pending),
        "environment": environment,
    }
    manifest.update(finished_batches=finished, status="running", n_batches=n_batches)
    manifest["environment"] = environment  # the latest attempt's; every attempt keeps its own
    # the files besides batches, progress and report that this run writes (so they are its own)
    manifest["files"] = sorted(set(manifest.get("files", [])) | {MERGED_FILE})
    manifest["attempts"] = manifest.get("attempts", []) + [attempt]
    write_manifest(out_dir, manifest)
    return pending


def _batch_is_valid(out_dir: Path, batch_id: int, batch_size: int, n_images: int) -> bool:
    try:
        data = read_batch(batch_path(out_dir, batch_id), [f"{META}/index", f"{META}/skipped_index"])
    except Exception:  # unreadable file
        return False
    if len(data) != 2:
        return False
    covered = np.sort(np.concatenate([data[f"{META}/index"], data[f"{META}/skipped_index"]]))
    return np.array_equal(covered, np.asarray(_batch_items(batch_id, batch_size, n_images)))


def _prepare_on_rank0(
    ctx: distributed.DistContext,
    out_dir: Path,
    config: Dict[str, Any],
    n_batches: int,
    batch_size: int,
    n_images: int,
    resume: bool,
    overwrite: bool,
) -> Tuple[List[int], str]:
    """Under torchrun: every rank must describe the same run; rank 0 takes the folder's lock,
    prepares the folder and tells the others which batches are pending and the lock's token, or
    raises the same error on every rank."""
    digest = hashlib.sha256(json.dumps(to_json(config), sort_keys=True).encode()).hexdigest()
    if len(set(ctx.all_gather(digest))) != 1:
        raise ValueError(
            "the ranks disagree on the run's configuration (model weights, data listing or "
            "settings); every rank must see the same model and data"
        )
    status: Dict[str, Any] = {}
    if ctx.is_main:
        token = None
        try:
            token = acquire_lock(out_dir, ctx.world_size)
            pending = _prepare(
                out_dir,
                config,
                n_batches,
                batch_size,
                n_images,
                resume,
                overwrite,
                ctx.world_size,
            )
            status = {"pending": pending, "token": token}
        except (ValueError, OSError, RunFolderLockedError) as err:
            if token is not None:
                release_lock(out_dir, token)
            status = {"error": type(err).__name__, "message": str(err)}
    status = ctx.broadcast(status)
    if "error" in status:
        raise _BROADCAST_ERRORS.get(status["error"], ValueError)(status["message"])
    return status["pending"], status["token"]


_BROADCAST_ERRORS = {
    "ConfigMismatchError": ConfigMismatchError,
    "ForeignFileError": ForeignFileError,
    "RunFolderLockedError": RunFolderLockedError,
}


def _check_shared_folder(ctx: distributed.DistContext, out_dir: Path, token: str) -> None:
    """Every rank must see the lock rank 0 took for this launch in the folder (a filesystem shared
    by all nodes, and no other launch's lock), or merging cannot work."""
    if not ctx.active:
        return
    holder = read_lock(out_dir)
    ok = ctx.all_gather(holder is not None and holder.get("token") == token)
    if not all(ok):
        blind = [r for r, s in enumerate(ok) if not s]
        raise RuntimeError(
            f"ranks {blind} do not see the lock rank 0 took in {out_dir}; under torchrun the "
            "output folder must be on a filesystem shared by all nodes, written by one launch"
        )


def _process(
    model: HookedViT,
    dataset: Any,
    analyses: Sequence[Analysis],
    out_dir: Path,
    batch_ids: Sequence[int],
    batch_size: int,
    n_images: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    num_workers: int,
    ctx: distributed.DistContext,
    token: str,
) -> None:
    """This rank's batches: load, run every analysis, write the batch file, record progress (each
    write only while this launch still holds the folder's lock)."""
    if not batch_ids:
        return
    hooks = hook_names_of(analyses, model)
    sampler = [_batch_items(b, batch_size, n_images) for b in batch_ids]
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    tracker = _ProgressTracker(out_dir, ctx)
    n_todo = sum(len(s) for s in sampler)
    was_training = model.training
    model.eval()
    try:
        with tqdm(
            total=n_todo, unit="img", disable=not progress, desc="analyze", dynamic_ncols=True
        ) as bar:
            for batch_id, batch in zip(batch_ids, loader):
                arrays = _run_batch(model, batch, analyses, hooks, device, dtype)
                check_lock(out_dir, token)
                write_batch(out_dir, batch_id, arrays)
                tracker.finished(batch_id)
                for s in batch.skipped:
                    warnings.warn(
                        f"skipped {s.image_id}: {s.reason}", UnusableImageWarning, stacklevel=2
                    )
                bar.update(len(batch) + len(batch.skipped))
    finally:
        model.train(was_training)


def _run_batch(
    model: HookedViT,
    batch: Batch,
    analyses: Sequence[Analysis],
    hooks: tuple,
    device: torch.device,
    dtype: torch.dtype,
) -> Dict[str, np.ndarray]:
    arrays = meta_arrays(
        batch.indices.tolist(),
        batch.labels.tolist(),
        batch.image_ids,
        batch.skipped,
        batch.conversions or None,
    )
    if not len(batch):
        return arrays
    check_batch_inputs(model, batch)
    batch = batch.to(device, dtype)
    readers = {}
    for analysis in analyses:
        reader = analysis.forward_reader(model, batch)
        if reader is not None:
            readers[analysis.name] = reader
    batch = batch.with_forward(SharedForward(hooks, readers))
    for analysis in analyses:
        out = analysis.run(model, batch)
        if not isinstance(out, Mapping):
            raise TypeError(
                f"{analysis.name}.run must return a dict of per-image arrays, got "
                f"{type(out).__name__}"
            )
        for key, value in out.items():
            if key in META_KEYS or "/" in key:
                raise ValueError(
                    f"{analysis.name}.run returned the key {key!r}; keys must not contain '/' or "
                    f"be one of {META_KEYS}"
                )
            arrays[f"{analysis.name}/{key}"] = check_array(
                value, f"{analysis.name}.run()[{key!r}]", len(batch)
            )
    batch.release()
    return arrays


class _ProgressTracker:
    """Keeps the list of finished batches on disk: in the manifest (one process) or one file per
    rank."""

    def __init__(self, out_dir: Path, ctx: distributed.DistContext) -> None:
        self.out_dir, self.ctx = out_dir, ctx
        if ctx.active:
            self.path = out_dir / PROGRESS_DIR / f"rank{ctx.rank}.json"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.done: List[int] = []
        else:
            self.manifest = read_manifest(out_dir)

    def finished(self, batch_id: int) -> None:
        if self.ctx.active:
            self.done.append(batch_id)
            atomic_write_json(
                self.path,
                {
                    "rank": self.ctx.rank,
                    "world_size": self.ctx.world_size,
                    "finished_batches": self.done,
                },
            )
        else:
            if self.manifest is None:  # written by the run's preparation, before any batch
                raise FileNotFoundError(f"{self.out_dir} has no run manifest to record progress in")
            self.manifest["finished_batches"] = sorted(
                set(self.manifest["finished_batches"]) | {batch_id}
            )
            write_manifest(self.out_dir, self.manifest)


def check_batch_inputs(model: HookedViT, batch: Batch) -> None:
    """Refuse inputs the analyses would misread, naming the image: integer (uint8) pixels, labels
    outside the model's classes, token masks that do not cover the model's token sequence."""
    if not batch.images.is_floating_point():
        raise TypeError(
            f"the data set gives {batch.images.dtype} images (first: {batch.image_ids[0]!r}); the "
            "runner takes preprocessed float images normalized as the model expects (uint8 pixels "
            "would be read as values up to 255): use ImageDataset with the model's preprocessing, "
            "or convert them (images.float() / 255, then the model's mean and std)"
        )
    n_classes = model.cfg.n_classes
    bad = ((batch.labels < 0) | (batch.labels >= n_classes)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"image {batch.image_ids[i]!r} has label {int(batch.labels[i])}, but the model has "
            f"{n_classes} classes (labels 0..{n_classes - 1})"
        )
    masks = batch.token_masks
    n_tokens = model.layout.n_tokens
    if masks is not None and (masks.ndim != 2 or masks.shape[-1] != n_tokens):
        raise ValueError(
            f"image {batch.image_ids[0]!r}: its token mask has shape {tuple(masks.shape[1:])}, but "
            f"the model's token sequence has {n_tokens} tokens ({model.layout.n_prefix} prefix + "
            "image tokens); build token masks with token_mask_from_mask(mask, model.layout)"
        )


def conversion_summary(results: RunResults) -> Dict[str, Any]:
    """The manifest's ``conversions``: images decoded other than plainly, counted by kind
    (``counts``) and listed (``images``: index, image_id, conversion; the first 1000)."""
    conv = np.asarray(results.conversions, dtype=str)
    rows = np.flatnonzero(conv != "") if len(conv) else np.zeros(0, dtype=np.int64)
    kinds, counts = np.unique(conv[rows], return_counts=True)
    return {
        "counts": {str(k): int(c) for k, c in zip(kinds, counts)},
        "images": [
            {
                "index": int(results.index[r]),
                "image_id": str(results.image_ids[r]),
                "conversion": str(conv[r]),
            }
            for r in rows[:MAX_LISTED]
        ],
    }


def _finish(out_dir: Path) -> RunResults:
    """Rank 0, after every rank is done: merge, verify, write the merged file, mark complete."""
    results = load_results(out_dir)  # raises if anything is missing or duplicated
    merged = {
        f"{META}/{k}": v
        for k, v in (
            ("index", results.index),
            ("label", results.labels),
            ("image_id", results.image_ids),
            ("conversion", results.conversions),
        )
    }
    for name, arrays in results.arrays.items():
        merged.update({f"{name}/{k}": v for k, v in arrays.items()})
    atomic_write_npz(out_dir / MERGED_FILE, merged)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir} has no run manifest; the run cannot be finished")
    manifest.update(
        finished_batches=batch_ids_on_disk(out_dir),
        status="complete",
        n_skipped=len(results.skipped),
        skipped=results.skipped.to_dict(orient="records")[:MAX_LISTED],
        conversions=conversion_summary(results),
    )
    write_manifest(out_dir, manifest)
    _remove_progress(out_dir)
    results.manifest = manifest
    return results
