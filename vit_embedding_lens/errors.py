"""Errors a user can act on: each names the model, the problem and, where there is one, the fix."""


class UnsupportedArchitectureError(ValueError):
    """The timm model uses an architecture feature HookedViT does not implement exactly."""


class ConversionError(ValueError):
    """Weights could not be converted strictly (a key left over, missing, or of the wrong shape)."""
