"""Whether the model hub can be reached, for notebooks and scripts with optional hub cells."""

from __future__ import annotations

import os
import socket


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
