"""Input normalization: every figure accepts a tidy DataFrame, a mapping of arrays, or one array.

All three become one long frame with columns ``block``, ``group`` and ``value`` (one row per
observation), so each figure is drawn from a single, inspectable table.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import to_numpy


def long_frame(
    data: Any,
    *,
    block_col: str = "block",
    group_col: Optional[str] = "group",
    value_col: str = "value",
    default_group: str = "all",
    what: str = "data",
    block_axis: int = 0,
) -> pd.DataFrame:
    """``block, group, value`` rows from a DataFrame, ``{group: array}`` or an array.

    In arrays, axis ``block_axis`` is the block and every other axis is flattened into observations
    (``[block, batch, pos]`` tensors go in as they are; per-image ``[batch, block]`` tables
    with ``block_axis=1``). NaNs are dropped.
    """
    if isinstance(data, pd.DataFrame):
        needed = [block_col, value_col] + ([group_col] if group_col and group_col in data else [])
        missing = [c for c in (block_col, value_col) if c not in data]
        if missing:
            raise ValueError(
                f"{what}: the DataFrame has no column(s) {missing} (columns: "
                f"{list(data.columns)}); name the right ones with block_col=/value_col="
            )
        frame = data[needed].rename(columns={block_col: "block", value_col: "value"})
        if group_col and group_col in data:
            frame = frame.rename(columns={group_col: "group"})
            frame["group"] = frame["group"].astype(str)
        else:
            frame["group"] = default_group
    elif isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{what}: the mapping is empty; give {{group: array [n_blocks, ...]}}")
        frame = pd.concat(
            [_array_frame(v, str(k), what, block_axis) for k, v in data.items()], ignore_index=True
        )
    else:
        frame = _array_frame(data, default_group, what, block_axis)
    frame = frame.dropna(subset=["value"])
    if frame.empty:
        raise ValueError(f"{what}: no finite values to plot")
    frame["value"] = frame["value"].astype(float)
    frame["block"] = frame["block"].astype(int)
    return frame[["block", "group", "value"]].reset_index(drop=True)


def _array_frame(values: Any, group: str, what: str, block_axis: int = 0) -> pd.DataFrame:
    arr = to_numpy(values, what).astype(float)
    if arr.ndim == 0:
        raise ValueError(f"{what}: expected an array [n_blocks, ...], got a scalar")
    if not -arr.ndim <= block_axis < arr.ndim:
        raise ValueError(f"{what}: block_axis={block_axis} but the array has shape {arr.shape}")
    arr = np.moveaxis(arr, block_axis, 0)
    n_blocks = arr.shape[0]
    flat = arr.reshape(n_blocks, -1)
    return pd.DataFrame(
        {
            "block": np.repeat(np.arange(n_blocks), flat.shape[1]),
            "group": group,
            "value": flat.ravel(),
        }
    )


def ordered_groups(frame: pd.DataFrame, order: Optional[Sequence[str]] = None) -> list:
    """Groups in the caller's order, or in order of first appearance."""
    present = list(dict.fromkeys(frame["group"]))
    if order is None:
        return present
    unknown = [g for g in order if g not in present]
    if unknown:
        raise ValueError(f"groups {unknown} are not in the data (present: {present})")
    return list(order)


def pvalue_frame(
    pvalues: Any,
    groups: Sequence[str],
    block_col: str = "block",
    group_col: str = "group",
    p_col: str = "p_value",
) -> pd.DataFrame:
    """``block, group, p_value`` from a DataFrame, ``{group: [block]}`` or one ``[block]``
    array (which then applies to every group)."""
    if isinstance(pvalues, pd.DataFrame):
        frame = long_frame(
            pvalues, block_col=block_col, group_col=group_col, value_col=p_col, what="pvalues"
        )
    elif isinstance(pvalues, Mapping):
        frame = long_frame(dict(pvalues), what="pvalues")
    else:
        arr = to_numpy(pvalues, "pvalues").astype(float)
        if arr.ndim != 1:
            raise ValueError(
                f"pvalues must be one value per block [n_blocks], got shape {arr.shape}"
            )
        frame = pd.concat(
            [
                pd.DataFrame({"block": np.arange(len(arr)), "group": g, "value": arr})
                for g in groups
            ],
            ignore_index=True,
        )
    if ((frame["value"] < 0) | (frame["value"] > 1)).any():
        raise ValueError("pvalues must lie in [0, 1]")
    if frame.duplicated(["block", "group"]).any():
        raise ValueError("pvalues: more than one p-value for the same block and group")
    return frame.rename(columns={"value": "p_value"})


def as_fractions(frame: pd.DataFrame, percent: bool, what: str) -> pd.DataFrame:
    """Rates as fractions in ``[0, 1]`` (percentages divided by 100 when ``percent``), checked."""
    if percent:
        frame = frame.assign(value=frame["value"] / 100.0)
    if ((frame["value"] < 0) | (frame["value"] > 1)).any():
        hint = "" if percent else "; for percentages pass percent=True"
        raise ValueError(f"{what} must be fractions in [0, 1]{hint}")
    return frame
