"""The mapping a HookedViT cache keeps its activations in; some kept as exact recipes until read.

A full cache of ViT-B/16 holds about 170 MiB per image, and every tensor in it has values of its
own. One kind is a pure function of another that the cache also holds: the MLP's
``mlp.hook_post`` is ``act(mlp.hook_pre)``, element by element. When the model's hook points
show that a cached ``hook_post`` is exactly that (no hook replaced or edited it, and the cached
``hook_pre`` is the very tensor the activation read), the store keeps the recipe instead of the
tensor and applies it on first read: the same function on the same tensor, so the same values,
bit for bit, for 2.3 MiB less per block and image (ViT-B/16: 169 -> 141 MiB per image).

To the caller the store is a mapping of hook names to tensors like the dict TransformerLens fills:
reading an entry, iterating ``items()`` or ``values()``, ``dict(store)`` and pickling all give
tensors. :class:`Derivation` is the record a hook point carries of how its tensor was computed.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, MutableMapping, Optional, Union

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint


class Derivation:
    """How a hook point's tensor was computed from another hook point's, ``output = fn(input)``,
    noted by the module during the forward pass, just before the hook point fires (weak
    references: the note keeps nothing alive).

    The note stands only while the hook point has no hook but the caching one: any other hook
    may replace or edit the tensor, and then the tensor is stored as it is.
    """

    def __init__(
        self, source: str, fn: Callable[[Tensor], Tensor], input: Tensor, output: Tensor, hooks: int
    ) -> None:
        self.source = source
        self.fn = fn
        self._input = weakref.ref(input)
        self._output = weakref.ref(output)
        self._hooks = hooks

    @property
    def input(self) -> Optional[Tensor]:
        return self._input()

    def explains(self, tensor: Tensor) -> bool:
        """True when ``tensor`` is the noted output and the caching hook is the only hook."""
        return self._hooks == 1 and tensor is self._output() and self._input() is not None


class DerivedHookPoint(HookPoint):
    """A hook point that carries its module's :class:`Derivation` of the current forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.derivation: Optional[Derivation] = None


class EditGuard:
    """Tells whether a tensor was edited in place since the guard was made: by its version
    counter, or, for inference tensors (which have none), by a fingerprint of its values (one
    fixed random projection per row, compared exactly)."""

    def __init__(self, tensor: Tensor) -> None:
        self._version: Optional[int] = None if tensor.is_inference() else tensor._version
        self._print = _fingerprint(tensor) if self._version is None else None

    def edited(self, tensor: Tensor) -> bool:
        if self._version is not None:
            return tensor._version != self._version
        assert self._print is not None
        return not torch.equal(_fingerprint(tensor), self._print)


def _fingerprint(tensor: Tensor) -> Tensor:
    """``tensor`` projected on a fixed random vector along its last axis (exact to compare: the
    same values give the same numbers)."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.rand(tensor.shape[-1], generator=gen).to(tensor.device, tensor.dtype)
    with torch.inference_mode():
        return tensor.reshape(-1, tensor.shape[-1]) @ direction


@dataclass
class _Recipe:
    """An entry kept as ``fn(store[source])``; ``guard`` tells whether the source was edited."""

    source: str
    fn: Callable[[Tensor], Tensor]
    guard: EditGuard


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` are the same values in the same memory (e.g. ``b.detach()`` of
    ``a``): same storage, offset, shape, strides and dtype."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


class ActivationStore(MutableMapping[str, Tensor]):
    """Hook name -> activation, in the order cached; entries added with :meth:`derive` are
    computed on first read (then kept), from an entry the store holds."""

    def __init__(self) -> None:
        self._entries: Dict[str, Union[Tensor, _Recipe]] = {}

    def derive(self, name: str, tensor: Tensor, derivation: Optional[Derivation]) -> bool:
        """Keep ``name`` as ``derivation.fn(self[derivation.source])`` when ``derivation``
        explains ``tensor`` and the store holds that source as the very tensor the derivation
        read; returns False (nothing kept: store the tensor) otherwise."""
        if derivation is None or not derivation.explains(tensor):
            return False
        held = self._entries.get(derivation.source)
        inp = derivation.input
        if not isinstance(held, Tensor) or inp is None or not same_tensor(held, inp):
            return False
        self._entries[name] = _Recipe(derivation.source, derivation.fn, EditGuard(held))
        return True

    def __getitem__(self, name: str) -> Tensor:
        entry = self._entries[name]
        if isinstance(entry, Tensor):
            return entry
        source = self[entry.source]
        if entry.guard.edited(source):
            raise RuntimeError(
                f"{entry.source} was edited in place after the run, so {name} (kept as its exact "
                f"function to save memory) can no longer be recomputed; read {name} before "
                f"editing {entry.source}, or call materialize() on the cache's store first"
            )
        with torch.no_grad():
            value = entry.fn(source)
        self._entries[name] = value
        return value

    def __setitem__(self, name: str, value: Tensor) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def is_derived(self, name: str) -> bool:
        """True while ``name`` is kept as a recipe (not read yet)."""
        return isinstance(self._entries[name], _Recipe)

    def held_tensors(self) -> Dict[str, Tensor]:
        """The entries held as tensors now, without computing any recipe (memory accounting)."""
        return {k: v for k, v in self._entries.items() if isinstance(v, Tensor)}

    def materialize(self) -> "ActivationStore":
        """Compute every recipe now (e.g. before editing cached tensors in place)."""
        for name in list(self._entries):
            self[name]
        return self

    def copy(self) -> Dict[str, Tensor]:
        """A plain dict of every entry (recipes computed)."""
        return dict(self.items())

    def __reduce__(self):
        # pickles (and torch.save's) as an OrderedDict of tensors, which torch.load reads with
        # weights_only=True, as it reads a state dict
        return (OrderedDict, (list(self.items()),))

    def __repr__(self) -> str:
        derived = sum(isinstance(v, _Recipe) for v in self._entries.values())
        return f"ActivationStore({len(self)} entries, {derived} kept as recipes until read)"
