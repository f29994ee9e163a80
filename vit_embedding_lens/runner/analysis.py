"""The analysis plug-in interface and its registry.

An analysis turns batches into per-image arrays, the arrays of a whole data set into tidy tables,
and tables into figures. The runner streams batches through every selected analysis, stores the
arrays, and hands the merged arrays back for the tables and figures::

    class MyAnalysis:
        name = "my_analysis"
        hook_names = ("blocks.0.hook_resid_post",)      # optional: activations to share

        def run(self, model, batch) -> dict[str, np.ndarray]:         # first axis = len(batch)
            logits, cache = batch.shared_forward(model)
            ...
        def summarize(self, results, model) -> dict[str, pd.DataFrame]: ...
        def figures(self, tables, model) -> dict[str, matplotlib.figure.Figure]: ...

    register_analysis("my_analysis", MyAnalysis)

``hook_names`` is optional (a sequence, or a method taking the model): the runner runs one
``run_with_cache`` per batch over the union of all analyses' names (``batch.shared_forward``), so
analyses that only read activations share a single forward pass; analyses that intervene run their
own forwards. ``config()`` (optional) returns the analysis's settings: they enter the run's
fingerprint, so a changed setting refuses to resume over old results. ``headline(tables)``
(optional) picks the small table the command line prints. Analyses of other packages register
through the ``vit_embedding_lens.analyses`` entry-point group.
"""

from __future__ import annotations

import re
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Protocol,
    Sequence,
    runtime_checkable,
)

import numpy as np

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@runtime_checkable
class Analysis(Protocol):
    """What the runner needs from an analysis (see the module docstring)."""

    name: str

    def run(self, model: Any, batch: Any) -> Dict[str, np.ndarray]:
        """Per-image arrays for one batch; the first axis of every array is the batch."""

    def summarize(self, results: Dict[str, np.ndarray], model: Any) -> Dict[str, Any]:
        """Tidy ``pandas.DataFrame`` tables (one row per observation) from the whole data set's arrays."""

    def figures(self, tables: Dict[str, Any], model: Any) -> Dict[str, Any]:
        """Matplotlib figures from the tables."""


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
    """Instantiate the named analyses (all registered ones for None), checking each against the protocol."""
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
    """Raise TypeError naming what an object lacks to be an :class:`Analysis`."""
    missing = [m for m in ("name", "run", "summarize", "figures") if not hasattr(analysis, m)]
    if missing:
        raise TypeError(f"{type(analysis).__name__} is not an Analysis: it lacks {missing}")
    if not NAME_PATTERN.match(str(analysis.name)):
        raise ValueError(f"analysis name {analysis.name!r} must be letters, digits, '_' or '-'")


def analysis_config(analysis: Analysis) -> Mapping[str, Any]:
    """The analysis's settings for the run fingerprint (``config()`` if it has one)."""
    config = getattr(analysis, "config", None)
    return dict(config()) if callable(config) else {}


def hook_names_of(analyses: Sequence[Analysis], model: Any) -> tuple:
    """Union of the activations the analyses share, in first-seen order."""
    names: Dict[str, None] = {}
    for a in analyses:
        wanted = getattr(a, "hook_names", ())
        wanted = wanted(model) if callable(wanted) else wanted
        names.update(dict.fromkeys(wanted))
    return tuple(names)


#: third-party packages register analyses under this entry-point group (``name = "pkg.mod:factory"``)
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
