"""The analysis plug-in interface and its registry.

An analysis turns batches into per-image arrays, the arrays of a whole data set into tidy tables,
and tables into figures. The runner streams batches through every selected analysis, stores the
arrays, and hands the merged arrays back for the tables and figures. An analysis subclasses
:class:`Analysis`: it must give ``name``, :meth:`~Analysis.run` and :meth:`~Analysis.summarize`;
everything else it may declare has a default::

    class MyAnalysis(Analysis):
        name = "my_analysis"

        def hook_names(self, model):                      # activations to share (default: none)
            return ["blocks.0.hook_resid_post"]

        def run(self, model, batch) -> dict[str, np.ndarray]:         # first axis = len(batch)
            logits, cache = batch.shared_forward(model)
            ...
        def summarize(self, results, model) -> dict[str, pd.DataFrame]: ...

    register_analysis("my_analysis", MyAnalysis)

Per batch the runner runs one forward pass shared by all analyses (``batch.shared_forward``): one
``run_with_cache`` over the union of their :meth:`~Analysis.hook_names`, with the hooks of every
:meth:`~Analysis.forward_reader` attached (readers reduce activations inside hooks instead of
caching them, as the lens does). Analyses that intervene run their own forwards. Analyses of other
packages register through the ``vit_embedding_lens.analyses`` entry-point group.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.runner.batch import Batch

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@runtime_checkable
class ForwardReader(Protocol):
    """Reads a batch's shared forward pass through hooks (e.g. the lens's
    :class:`~vit_embedding_lens.lens.streaming.LensRecorder`) and keeps what it read."""

    def hooks(self) -> List[Tuple[str, Callable[..., Any]]]:
        """``(hook name, function)`` pairs attached during the shared forward pass."""


class Analysis(ABC):
    """What the runner needs from an analysis; subclass it (see the module docstring).

    Must give: :attr:`name`, :meth:`run`, :meth:`summarize`. May declare (defaults in brackets):
    :meth:`config` (``{}``), :meth:`hook_names` (none), :meth:`forward_reader` (none),
    :meth:`figures` (none), :meth:`headline` (None: the report picks a table), and for the report
    :attr:`description`, :meth:`figure_captions` and :meth:`notes` (empty).
    """

    #: names the analysis's arrays, tables and files (letters, digits, ``_``, ``-``)
    name: str

    #: two or three sentences the report shows above the analysis's figures: what it measures and
    #: how to read it
    description: str = ""

    def config(self) -> Mapping[str, Any]:
        """The analysis's settings. They enter the run's fingerprint, so a run with changed
        settings refuses to resume over old results."""
        return {}

    def hook_names(self, model: HookedViT) -> Sequence[str]:
        """Activations this analysis reads from the batch's shared ``run_with_cache``
        (``batch.shared_forward(model)[1]``); the runner caches the union over all analyses."""
        return ()

    def forward_reader(self, model: HookedViT, batch: Batch) -> Optional[ForwardReader]:
        """A reader whose hooks run during this batch's shared forward pass, or None. The runner
        attaches it and hands it back through ``batch.reader(model, self.name)`` in :meth:`run`."""
        return None

    @abstractmethod
    def run(self, model: HookedViT, batch: Batch) -> Dict[str, np.ndarray]:
        """Per-image arrays for one batch; the first axis of every array is the batch."""

    @abstractmethod
    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        """Tidy tables (one row per observation) from the whole data set's arrays."""

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Figure]:
        """Matplotlib figures (or interactive views, such as a circuit graph, that the report
        embeds offline) from the tables."""
        return {}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> Optional[pd.DataFrame]:
        """The small table the command line prints, or None to print the ``summary`` table (else
        the first table's first rows)."""
        return None

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        """Per figure name, the report's caption: what the lines, bands and markers are, which test
        the stars come from, and how many images (``n_images``) the figure summarizes."""
        return {}

    def notes(self, tables: Dict[str, pd.DataFrame]) -> List[str]:
        """Known findings and caveats these tables show, flagged in the report so that they are
        not read as bugs (e.g. a method losing to its baseline on small models)."""
        return []


#: what an object must have to run as an analysis without subclassing :class:`Analysis`
PROTOCOL = ("config", "hook_names", "forward_reader", "run", "summarize", "figures", "headline")


AnalysisFactory = Callable[[], Analysis]

#: name -> factory (a class or a function without arguments that returns an Analysis)
ANALYSES: Dict[str, AnalysisFactory] = {}


def register_analysis(
    name: str, factory: AnalysisFactory, overwrite: bool = False
) -> AnalysisFactory:
    """Register ``factory`` under ``name`` (letters, digits, ``_``, ``-``). Returns the factory."""
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"analysis name {name!r} must be letters, digits, '_' or '-' (it names files)"
        )
    if name in ANALYSES and not overwrite and ANALYSES[name] is not factory:
        raise ValueError(
            f"an analysis named {name!r} is already registered; pass overwrite=True to replace it"
        )
    if not callable(factory):
        raise TypeError(f"the factory for {name!r} must be callable, got {type(factory).__name__}")
    ANALYSES[name] = factory
    return factory


def available_analyses() -> List[str]:
    """Registered analysis names, in registration order."""
    _ensure_builtins()
    return list(ANALYSES)


def build_analyses(names: Iterable[str] | None = None) -> List[Analysis]:
    """Instantiate the named analyses (all registered ones for None), checking each against the
    protocol."""
    _ensure_builtins()
    names = list(ANALYSES) if names is None else [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no analyses selected; available: {list(ANALYSES)}")
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; available: {list(ANALYSES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"analyses listed twice: {names}")
    built = []
    for n in names:
        analysis = ANALYSES[n]()
        check_analysis(analysis)
        if analysis.name != n:
            raise ValueError(f"the analysis registered as {n!r} calls itself {analysis.name!r}")
        built.append(analysis)
    return built


def check_analysis(analysis: Any) -> None:
    """Raise TypeError naming what an object lacks to be an :class:`Analysis` (a subclass has
    everything; another object must have the whole :data:`PROTOCOL`), ValueError for a bad name."""
    if not isinstance(analysis, Analysis):
        missing = [m for m in ("name", *PROTOCOL) if not hasattr(analysis, m)]
        if missing:
            raise TypeError(
                f"{type(analysis).__name__} is not an Analysis: it lacks {missing} "
                "(subclass vit_embedding_lens.runner.Analysis for the defaults)"
            )
    if not NAME_PATTERN.match(str(analysis.name)):
        raise ValueError(f"analysis name {analysis.name!r} must be letters, digits, '_' or '-'")


def hook_names_of(analyses: Sequence[Analysis], model: HookedViT) -> Tuple[str, ...]:
    """Union of the activations the analyses share, in first-seen order."""
    names: Dict[str, None] = {}
    for a in analyses:
        names.update(dict.fromkeys(a.hook_names(model)))
    return tuple(names)


#: third-party packages register analyses under this entry-point group
#: (``name = "pkg.mod:factory"``)
ENTRY_POINT_GROUP = "vit_embedding_lens.analyses"
_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    """Register the built-in analyses, then entry-point plug-ins, on first use."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from importlib.metadata import entry_points

    import vit_embedding_lens.runner.analyses  # noqa: F401  (registers on import)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in ANALYSES:
            continue
        try:
            register_analysis(ep.name, ep.load())
        except Exception as err:  # a broken plug-in must not take the built-ins down
            import warnings

            warnings.warn(
                f"analysis plug-in {ep.name!r} ({ep.value}) failed to load: {err}", stacklevel=2
            )
