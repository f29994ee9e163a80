"""The one parser of model names: what a name (and an optional checkpoint) says to load.

    bundled:mnist-vit, bundled:mnist-clip      -> "bundled"      (shipped with the package)
    vit_base_patch16_224.augreg_in21k_ft_in1k  -> "timm"         (architecture + pretrained tag)
    vit_tiny_patch16_224 + checkpoint w.pt     -> "checkpoint"   (timm architecture, your weights)
    local-dir:/models/vit, or a folder         -> "timm-folder"  (config.json + weights by timm)
    hf:google/vit-base-patch16-224             -> "hf"           (a Hugging Face hub name)
    hf:/models/my-vit, or a folder             -> "hf-folder"    (save_pretrained: config.json
                                                                   with a ``model_type``)
    open_clip:ViT-B-16[:laion2b_s34b_b88k]     -> "open_clip"    (OpenCLIP architecture, optional
                                                                   pretrained tag or weights file)

Parsing imports no timm, transformers or open_clip; whether a name exists is checked on loading.
The only file it reads is a folder's ``config.json``: a Hugging Face folder's names a
``model_type``, a timm folder's does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple, Union

#: model names ``bundled:NAME`` name a bundled model (``HookedViT.from_timm``, ``--model``)
BUNDLED_PREFIX = "bundled:"
#: timm's prefix for a model folder (``config.json`` + weights)
LOCAL_DIR_PREFIX = "local-dir:"
#: model names ``hf:NAME`` name a Hugging Face hub model, ``hf:PATH`` a ``save_pretrained`` folder
HF_PREFIX = "hf:"
#: model names ``open_clip:ARCH[:PRETRAINED]`` name an OpenCLIP model
OPEN_CLIP_PREFIX = "open_clip:"

SourceKind = Literal["bundled", "timm", "timm-folder", "checkpoint", "hf", "hf-folder", "open_clip"]


@dataclass(frozen=True)
class ModelSource:
    """A parsed model name: its ``kind``, the ``name`` it goes by in that kind, and a ``path``.

    - ``bundled``: ``name`` is the bundled model (``"mnist-vit"``), no path;
    - ``timm``: ``name`` is the timm name with its optional pretrained ``tag``, no path;
    - ``checkpoint``: ``name`` is the timm architecture, ``path`` the weights file for it;
    - ``timm-folder``: ``path`` is the folder (``name`` is ``local-dir:<absolute path>``);
    - ``hf``: ``name`` is the Hugging Face hub name (``google/vit-base-patch16-224``), no path;
    - ``hf-folder``: ``path`` is the ``save_pretrained`` folder (``name`` is its absolute path);
    - ``open_clip``: ``name`` is ``ARCH`` or ``ARCH:PRETRAINED`` (``tag``: the pretrained tag),
      ``path`` an optional weights file for the architecture.
    """

    kind: SourceKind
    name: str
    path: Optional[Path] = None

    @property
    def architecture(self) -> str:
        """The timm architecture (the name without its pretrained tag); the name for others."""
        if self.kind == "open_clip":
            return _split_open_clip(self.name)[0]
        return self.name.split(".")[0] if self.kind in ("timm", "checkpoint") else self.name

    @property
    def tag(self) -> Optional[str]:
        """The pretrained tag of a timm name (``augreg_in21k_ft_in1k``), or None."""
        if self.kind == "open_clip":
            return _split_open_clip(self.name)[1]
        if self.kind not in ("timm", "checkpoint") or "." not in self.name:
            return None
        return self.name.split(".", 1)[1]

    @property
    def label(self) -> str:
        """What a loaded model is called (``cfg.model_name``, a run's config)."""
        if self.kind == "bundled":
            return f"{BUNDLED_PREFIX}{self.name}"
        if self.kind in ("hf", "hf-folder"):
            return f"{HF_PREFIX}{self.name}"
        if self.kind == "open_clip":
            return f"{OPEN_CLIP_PREFIX}{self.name}"
        return self.name


def parse_model_name(
    name: Optional[str], checkpoint: Optional[Union[str, Path]] = None
) -> ModelSource:
    """The :class:`ModelSource` a model name and an optional checkpoint describe.

    ``checkpoint`` is a weights file for the named timm (or OpenCLIP) architecture, or, without a
    name, a folder saved by timm or by Hugging Face ``save_pretrained``. A name that is an existing
    folder is read the same way. Raises ``ValueError`` (or ``FileNotFoundError`` for a folder
    without ``config.json``) naming the problem and the fix.
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
                f"{name!r} names no bundled model; use {BUNDLED_PREFIX}mnist-vit, "
                f"{BUNDLED_PREFIX}fashion-vit or {BUNDLED_PREFIX}mnist-clip"
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
    if name.startswith(HF_PREFIX):
        return _hf_source(name, name[len(HF_PREFIX) :].strip(), checkpoint)
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_source(name, name[len(OPEN_CLIP_PREFIX) :].strip(), checkpoint)
    if any(c in name for c in "/\\") and Path(name).is_dir():
        if checkpoint is not None:
            raise ValueError(f"{name} is a model folder with its own weights: no checkpoint")
        return _folder_source(Path(name))
    if any(c in name for c in "/\\:") or name.startswith(".") or name.endswith("."):
        raise ValueError(
            f"{name!r} is not a timm model name or a known source: use a timm name "
            f"(vit_base_patch16_224, or with a pretrained tag "
            f"vit_base_patch16_224.augreg_in21k_ft_in1k), {BUNDLED_PREFIX}NAME, "
            f"{LOCAL_DIR_PREFIX}PATH for a folder saved by timm, {HF_PREFIX}NAME for a Hugging "
            f"Face model (hub name or save_pretrained folder), or "
            f"{OPEN_CLIP_PREFIX}ARCH[:PRETRAINED] for an OpenCLIP model"
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
            f"{path} has no config.json; a timm model folder (or a Hugging Face save_pretrained "
            f"folder) holds config.json and the weights"
        )
    path = path.resolve()
    if is_hf_folder(path):
        return ModelSource("hf-folder", str(path), path)
    return ModelSource("timm-folder", f"{LOCAL_DIR_PREFIX}{path}", path)


def is_hf_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder written by transformers' ``save_pretrained``: its
    ``config.json`` names a ``model_type`` (timm's names an ``architecture`` instead)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # reported when the folder is loaded
    return isinstance(config, dict) and "model_type" in config and "architecture" not in config


def without_hf_prefix(text: str) -> str:
    """``text`` after the ``hf:`` prefix when it has one (a hub name or a folder), else as is."""
    return text[len(HF_PREFIX) :] if text.startswith(HF_PREFIX) else text


def _hf_source(name: str, rest: str, checkpoint: Optional[Union[str, Path]]) -> ModelSource:
    """``hf:NAME`` (hub) or ``hf:PATH`` (a ``save_pretrained`` folder)."""
    if not rest:
        raise ValueError(
            f"{name!r} names no Hugging Face model; use {HF_PREFIX}google/vit-base-patch16-224 "
            f"or {HF_PREFIX}/path/to/save_pretrained-folder"
        )
    if checkpoint is not None:
        raise ValueError(f"{name}: a Hugging Face model carries its own weights: no checkpoint")
    path = Path(rest)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; a Hugging Face model folder is written by "
                f"model.save_pretrained(folder)"
            )
        path = path.resolve()
        return ModelSource("hf-folder", str(path), path)
    if rest.startswith((".", "/", "~")) or "\\" in rest or rest.count("/") > 1:
        raise ValueError(
            f"{name!r}: {rest} is not a folder (a save_pretrained folder must exist) nor a hub "
            f"name (ORG/NAME)"
        )
    return ModelSource("hf", rest)


def _split_open_clip(name: str) -> Tuple[str, Optional[str]]:
    """``ARCH[:PRETRAINED]`` -> (ARCH, PRETRAINED or None); ``hf-hub:ORG/NAME`` is one
    architecture."""
    if name.startswith("hf-hub:"):
        return name, None
    arch, _, tag = name.partition(":")
    return arch, tag or None


def _open_clip_source(name: str, rest: str, checkpoint: Optional[Union[str, Path]]) -> ModelSource:
    arch, tag = _split_open_clip(rest)
    if not arch or (rest.endswith(":") and not rest.startswith("hf-hub:")):
        raise ValueError(
            f"{name!r} names no OpenCLIP model; use {OPEN_CLIP_PREFIX}ViT-B-16 (random weights), "
            f"{OPEN_CLIP_PREFIX}ViT-B-16:laion2b_s34b_b88k (a pretrained tag, needs the hub) or "
            f"{OPEN_CLIP_PREFIX}ViT-B-16 with a checkpoint file"
        )
    if checkpoint is not None:
        if tag is not None:
            raise ValueError(f"{name}: give a pretrained tag or a checkpoint, not both")
        return ModelSource("open_clip", rest, Path(checkpoint))
    return ModelSource("open_clip", rest)


def bundled_name(model_name: object) -> Optional[str]:
    """``"mnist-vit"`` for the model name ``"bundled:mnist-vit"``; None for any other
    name/object."""
    if isinstance(model_name, str) and model_name.startswith(BUNDLED_PREFIX):
        return model_name[len(BUNDLED_PREFIX) :]
    return None
