"""Whether the model hub can be reached, and whether a model's pretrained weights are already
cached, for notebooks, scripts with optional hub cells and the command line's ``--pretrained``."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether ``pretrained=True`` can download: ``HF_HUB_OFFLINE`` is unset and ``host`` answers on
    port 443 within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pretrained_cached(name: str) -> bool:
    """Whether timm's pretrained weights of ``name`` are in the local Hugging Face hub cache (or
    torch hub's, for weights timm fetches by URL), so loading them needs no network. Best effort:
    False when unsure."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name or tag is reported by the loader
        return False
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        repo = cfg.hf_hub_id.split("@")[0]
        return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)
    if isinstance(cfg.url, str) and cfg.url:
        import torch.hub

        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()
    return False


def use_cache_only() -> None:
    """Read pretrained weights from the local cache without trying the network, for the rest of
    this process (``HF_HUB_OFFLINE``, and huggingface_hub's copy of it if already imported):
    an unreachable hub otherwise costs each download its timeouts and retries first."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        setattr(constants, "HF_HUB_OFFLINE", True)  # noqa: B010 - a module constant
