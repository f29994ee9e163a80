"""Reading a run back: every image's arrays in data set order, checked complete and unique."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import pandas as pd

from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.runner.storage import META, batch_ids_on_disk, batch_path, read_batch

#: keys of the run's own per-image arrays, added to each analysis's results for ``summarize``
META_KEYS = ("index", "label", "image_id")


class IncompleteRunError(ValueError):
    """The output folder's batches do not cover the data set exactly once."""


@dataclass
class RunResults:
    """Per-image arrays of a finished run, in data set order (skipped images left out).

    ``index[i]`` is the data set position of row ``i``; ``arrays[analysis][key]`` has ``len(index)``
    rows. ``results["accuracy"]`` gives one analysis's arrays plus ``index``, ``label``,
    ``image_id``.
    """

    index: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    arrays: Dict[str, Dict[str, np.ndarray]]
    skipped: pd.DataFrame
    manifest: Dict[str, Any] = field(default_factory=dict)
    #: per row, how the image was decoded when not plainly (``"16-bit"``, ...; ``""`` if plainly)
    conversions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def analyses(self) -> List[str]:
        return list(self.arrays)

    def __getitem__(self, analysis: str) -> Dict[str, np.ndarray]:
        if analysis not in self.arrays:
            raise KeyError(f"no results for analysis {analysis!r}; this run has {self.analyses}")
        meta = {"index": self.index, "label": self.labels, "image_id": self.image_ids}
        return {**self.arrays[analysis], **meta}


def load_results(out_dir: Union[str, Path]) -> RunResults:
    """Merge a run's batch files into per-image arrays in data set order.

    Checks that every batch of the run is present, that each holds exactly its own items, and that
    every data set item appears once, either with results or as skipped; raises
    :class:`IncompleteRunError` otherwise (rerun the same command to finish a run).
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir} holds no run (no manifest.json)")
    config = manifest["config"]
    n_images, batch_size = int(config["n_images"]), int(config["batch_size"])
    n_batches = math.ceil(n_images / batch_size)
    present = set(batch_ids_on_disk(out_dir))
    missing = [b for b in range(n_batches) if b not in present]
    if missing:
        raise IncompleteRunError(
            f"{out_dir}: {len(missing)} of {n_batches} batches are not finished (first: "
            f"{missing[:10]}); rerun the same command to resume"
        )
    parts: Dict[str, List[np.ndarray]] = {}
    seen = np.zeros(n_images, dtype=np.int64)
    skipped_rows = []
    for b in range(n_batches):
        data = read_batch(batch_path(out_dir, b))
        expected = np.arange(b * batch_size, min((b + 1) * batch_size, n_images))
        index, skipped_index = data[f"{META}/index"], data[f"{META}/skipped_index"]
        covered = np.sort(np.concatenate([index, skipped_index]))
        if not np.array_equal(covered, expected):
            raise IncompleteRunError(
                f"batch {b} of {out_dir} covers items {covered.tolist()[:8]}..., expected "
                f"{expected[0]}..{expected[-1]}; the folder mixes runs: start over with --overwrite"
            )
        np.add.at(seen, covered, 1)
        if f"{META}/conversion" not in data:  # a batch file written before conversions were kept
            data[f"{META}/conversion"] = np.full(len(index), "", dtype=str)
        for i, image_id, reason in zip(
            skipped_index, data[f"{META}/skipped_image_id"], data[f"{META}/skipped_reason"]
        ):
            skipped_rows.append({"index": int(i), "image_id": str(image_id), "reason": str(reason)})
        for key, value in data.items():
            if len(index) or key.startswith(f"{META}/skipped"):
                parts.setdefault(key, []).append(value)
    if (seen != 1).any():
        bad = np.flatnonzero(seen != 1)
        raise IncompleteRunError(
            f"items {bad[:10].tolist()} appear {seen[bad[:10]].tolist()} times in {out_dir}"
        )
    merged = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    index = merged.pop(f"{META}/index", np.zeros(0, dtype=np.int64))
    order = np.argsort(index, kind="stable")
    if not np.array_equal(order, np.arange(len(index))):
        merged = {
            k: (v[order] if not k.startswith(f"{META}/skipped") else v) for k, v in merged.items()
        }
        index = index[order]
    arrays: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in merged.items():
        group, name = key.split("/", 1)
        if group != META:
            if len(value) != len(index):
                raise IncompleteRunError(
                    f"{key} has {len(value)} rows for {len(index)} images in {out_dir}"
                )
            arrays.setdefault(group, {})[name] = value
    skipped = pd.DataFrame(skipped_rows, columns=["index", "image_id", "reason"]).sort_values(
        "index", ignore_index=True
    )
    return RunResults(
        index=index,
        labels=merged.get(f"{META}/label", np.zeros(0, dtype=np.int64)),
        image_ids=merged.get(f"{META}/image_id", np.zeros(0, dtype=str)),
        arrays=arrays,
        skipped=skipped,
        manifest=manifest,
        conversions=merged.get(f"{META}/conversion", np.full(len(index), "", dtype=str)),
    )
