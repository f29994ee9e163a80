"""The one parser of model names: what a name (and an optional checkpoint) says to load.

    bundled:mnist-vit                          -> "bundled"      (shipped with the package)
    vit_base_patch16_224.augreg_in21k_ft_in1k  -> "timm"         (architecture + pretrained tag)
    vit_tiny_patch16_224 + checkpoint w.pt     -> "checkpoint"   (timm architecture, your weights)
    local-dir:/models/vit, or a folder         -> "timm-folder"  (config.json + weights by timm)

Parsing reads no file and imports no timm; whether a timm name exists is checked on loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

#: model names ``bundled:NAME`` name a bundled model (``HookedViT.from_timm``, ``--model``)
BUNDLED_PREFIX = "bundled:"
#: timm's prefix for a model folder (``config.json`` + weights)
LOCAL_DIR_PREFIX = "local-dir:"

SourceKind = Literal["bundled", "timm", "timm-folder", "checkpoint"]


@dataclass(frozen=True)
class ModelSource:
    """A parsed model name: its ``kind``, the ``name`` it goes by in that kind, and a ``path``.

    - ``bundled``: ``name`` is the bundled model (``"mnist-vit"``), no path;
    - ``timm``: ``name`` is the timm name with its optional pretrained ``tag``, no path;
    - ``checkpoint``: ``name`` is the timm architecture, ``path`` the weights file for it;
    - ``timm-folder``: ``path`` is the folder (``name`` is ``local-dir:<absolute path>``).
    """

    kind: SourceKind
    name: str
    path: Optional[Path] = None

    @property
    def architecture(self) -> str:
        """The timm architecture (the name without its pretrained tag); the name for others."""
        return self.name.split(".")[0] if self.kind in ("timm", "checkpoint") else self.name

    @property
    def tag(self) -> Optional[str]:
        """The pretrained tag of a timm name (``augreg_in21k_ft_in1k``), or None."""
        if self.kind not in ("timm", "checkpoint") or "." not in self.name:
            return None
        return self.name.split(".", 1)[1]

    @property
    def label(self) -> str:
        """What a loaded model is called (``cfg.model_name``, a run's config)."""
        if self.kind == "bundled":
            return f"{BUNDLED_PREFIX}{self.name}"
        return self.name


def parse_model_name(
    name: Optional[str], checkpoint: Optional[Union[str, Path]] = None
) -> ModelSource:
    """The :class:`ModelSource` a model name and an optional checkpoint describe.

    ``checkpoint`` is a weights file for the named timm architecture, or, without a name, a folder
    saved by timm. Raises ``ValueError`` (or ``FileNotFoundError`` for a folder without
    ``config.json``) naming the problem and the fix.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"a model name is a string, got {type(name).__name__}")
    if name is not None:
        name = name.strip()
        if not name:
            raise ValueError("the model name is empty; name a timm model or bundled:mnist-vit")
    if name is None:
        if checkpoint is None:
            raise ValueError(
                "name a model: --model NAME (a timm name or bundled:mnist-vit) or --checkpoint PATH"
            )
        return _folder_source(Path(checkpoint))
    bundled = bundled_name(name)
    if bundled is not None:
        if not bundled:
            raise ValueError(
                f"{name!r} names no bundled model; use {BUNDLED_PREFIX}mnist-vit or "
                f"{BUNDLED_PREFIX}fashion-vit"
            )
        if checkpoint is not None:
            raise ValueError(
                f"{name}: a bundled model takes no checkpoint (its trained weights ship with the "
                f"package)"
            )
        return ModelSource("bundled", bundled)
    if name.startswith(LOCAL_DIR_PREFIX):
        if checkpoint is not None:
            raise ValueError(f"{name} is a timm model folder with its own weights: no checkpoint")
        return _folder_source(Path(name[len(LOCAL_DIR_PREFIX) :]))
    if any(c in name for c in "/\\:") or name.startswith(".") or name.endswith("."):
        raise ValueError(
            f"{name!r} is not a timm model name or a known source: use a timm name "
            f"(vit_base_patch16_224, or with a pretrained tag "
            f"vit_base_patch16_224.augreg_in21k_ft_in1k), {BUNDLED_PREFIX}NAME, or "
            f"{LOCAL_DIR_PREFIX}PATH for a folder saved by timm"
        )
    if checkpoint is not None:
        return ModelSource("checkpoint", name, Path(checkpoint))
    return ModelSource("timm", name)


def _folder_source(path: Path) -> ModelSource:
    if not path.is_dir():
        raise ValueError(
            f"{path} is a weights file, which does not say which architecture it is for: name it "
            f"with --model (e.g. --model vit_base_patch16_224 --checkpoint {path}), or pass a "
            f"folder saved by timm (config.json + weights)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; a timm model folder holds config.json and the weights"
        )
    path = path.resolve()
    return ModelSource("timm-folder", f"{LOCAL_DIR_PREFIX}{path}", path)


def bundled_name(model_name: object) -> Optional[str]:
    """``"mnist-vit"`` for the model name ``"bundled:mnist-vit"``; None for any other
    name/object."""
    if isinstance(model_name, str) and model_name.startswith(BUNDLED_PREFIX):
        return model_name[len(BUNDLED_PREFIX) :]
    return None
