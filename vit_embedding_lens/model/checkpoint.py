"""Weights files: a plain state dict read safely, and loaded strictly into a module.

Only torch and safetensors: the loading floor (checkpoints, bundled models) and the training
script use these; they know nothing about model names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import Tensor, nn

from vit_embedding_lens.errors import ConversionError


def read_state_dict(path: Union[str, Path]) -> Dict[str, Tensor]:
    """A state dict from a safetensors file, or from a torch file read with ``weights_only=True``.

    Never unpickles arbitrary objects. Accepts the common wrappers (``{"state_dict": ...}``,
    ``{"model": ...}``) and strips DistributedDataParallel's ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state: Any  # whatever the file holds, checked below
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors' own error type (a corrupt or truncated file)
            raise ConversionError(
                f"could not read {path} as safetensors ({type(err).__name__}: {err}); the file is "
                f"damaged or not a safetensors file"
            ) from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError and friends
            raise ConversionError(
                f"could not read {path} as a plain tensor checkpoint (weights_only=True refuses "
                f"arbitrary pickled objects): {err}. Save model.state_dict() with torch.save or as "
                f"safetensors."
            ) from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_checkpoint_(model: nn.Module, path: Union[str, Path]) -> None:
    """Load a user's checkpoint into a timm model, strictly, naming any missing or extra key."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ConversionError(
            f"checkpoint {path} does not match the timm model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, wrong shapes {wrong_shape[:10]}"
        )
    model.load_state_dict(state, strict=True)
