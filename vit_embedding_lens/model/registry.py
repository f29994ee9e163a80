"""The seam between HookedViT and the loading floor above it.

``HookedViT.from_timm`` and ``from_bundled`` need model names parsed and timm modules created, which
is the loading floor's job (:mod:`vit_embedding_lens.loading`); ``model/`` may not import it. So the
floor registers its loaders here when it is imported, and the constructors look them up by kind.
The package root imports that floor lazily (so ``import vit_embedding_lens`` stays light): a lookup
that finds no loader asks the root to import it once (:func:`_import_default_loaders`) before it
gives up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Tuple

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: a loader takes the constructor's arguments and returns the converted model
Loader = Callable[..., "HookedViT"]

_LOADERS: Dict[str, Loader] = {}


def register_loader(kind: str, fn: Loader) -> None:
    """Make ``fn`` the loader of ``kind`` (``"timm"``, ``"bundled"``, ...), replacing any other."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a loader kind is a non-empty string, got {kind!r}")
    if not callable(fn):
        raise TypeError(f"the loader of {kind!r} must be callable, got {type(fn).__name__}")
    _LOADERS[kind] = fn


def loader(kind: str) -> Loader:
    """The loader registered for ``kind``; a clear error when none is."""
    if kind not in _LOADERS:
        _import_default_loaders()
    if kind not in _LOADERS:
        raise LookupError(
            f"no model loader is registered for {kind!r} (registered: {registered_kinds()}); "
            f"import vit_embedding_lens.loading, which registers the library's loaders"
        )
    return _LOADERS[kind]


def _import_default_loaders() -> None:
    """Have the package root import its loading floor (which registers the library's loaders); the
    root is every module's parent, so this names no floor above this one."""
    import vit_embedding_lens

    register = getattr(vit_embedding_lens, "_register_loaders", None)
    if callable(register):
        register()


def registered_kinds() -> Tuple[str, ...]:
    """The kinds with a loader, sorted."""
    return tuple(sorted(_LOADERS))
