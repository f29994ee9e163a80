"""Errors a user can act on: each names the model, the problem and, where there is one, the fix."""

from __future__ import annotations

from typing import Optional


class UnsupportedArchitectureError(ValueError):
    """The timm model uses an architecture feature HookedViT does not implement exactly.

    ``model`` names the model and ``feature`` the refused feature (e.g. ``"rotary position
    embeddings (blocks.0.attn)"``), so callers such as the model survey read them, not the message.
    """

    def __init__(
        self, message: str, *, model: Optional[str] = None, feature: Optional[str] = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.feature = feature


class ConversionError(ValueError):
    """Weights could not be converted strictly (a key left over, missing, or of the wrong shape)."""


class HubUnreachableError(OSError):
    """Pretrained weights could not be downloaded (no network, ``HF_HUB_OFFLINE``, a missing file).

    ``model`` names the model and ``reason`` says why; callers (the command line) can say what to
    do instead in their own terms, without parsing the message.
    """

    def __init__(
        self, message: str, *, model: Optional[str] = None, reason: Optional[str] = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason


class RunFolderLockedError(RuntimeError):
    """Another run writes (or wrote, and may still write) this output folder (``runner.lock``)."""
