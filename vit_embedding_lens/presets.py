"""Presets: one switch for every choice where the library and the paper's reference code differ by
design (METHODS; docs "Reproducing the paper").

``"library"`` (the default) computes the library's definitions; ``"paper"`` sets each choice to the
reference code's, so that published numbers are reproduced (library | paper):

- knockout: scores masked before the softmax | weights edited after it, not renormalized
  (``self_only`` sets each image token's self-weight to 1);
- token labels: the patch-centre pixel (``nearest``) | the top-left pixel (``corner``);
- attribution loss: cross-entropy on the projected logits | on their softmax (``double_softmax``);
- % identifiable in knockout and context removal: image tokens | all tokens, CLS included;
- perturbation AUC: the full curve, every ``n`` | the same.

    from vit_embedding_lens.presets import run_preset
    results = run_preset(model, dataset, "out/", preset="paper")   # analyses configured, recorded

or ``vit-lens analyze --preset paper`` / ``vit-lens demo --preset paper``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

#: the presets, the default first
PRESET_NAMES = ("library", "paper")


@dataclass(frozen=True)
class Preset:
    """The choices one preset makes (see the module docstring)."""

    name: str
    #: :func:`~vit_embedding_lens.interventions.knockout` mode of the knockout analysis
    knockout_mode: str
    #: mask -> token rule (:func:`~vit_embedding_lens.data.token_labels.mask_to_grid` method)
    token_labels: str
    #: the class-space attribution's loss
    attribution_loss: str
    #: which tokens the knockout and context-removal percentages count ("image" or "all")
    identifiability_tokens: str
    #: the perturbation curve's ``n``: "full" (every n) or "grid"
    perturbation_n_keep: str = "full"

    def analysis_options(self) -> Dict[str, Dict[str, Any]]:
        """Keyword arguments of the built-in analyses this preset configures, by analysis name."""
        return {
            "knockout": {"mode": self.knockout_mode, "tokens": self.identifiability_tokens},
            "context_removal": {"tokens": self.identifiability_tokens},
            "attribution": {"loss": self.attribution_loss, "n_keep": self.perturbation_n_keep},
        }

    def as_dict(self) -> Dict[str, Any]:
        """The preset as plain data (for the manifest and the report)."""
        return asdict(self)


PRESETS: Dict[str, Preset] = {
    "library": Preset("library", "pre_softmax", "nearest", "cross_entropy", "image"),
    "paper": Preset("paper", "post_softmax", "corner", "double_softmax", "all"),
}


def get_preset(preset: Union[str, Preset, None] = None) -> Preset:
    """A :class:`Preset` by name (None: ``"library"``)."""
    if isinstance(preset, Preset):
        return preset
    name = "library" if preset is None else str(preset)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {PRESET_NAMES}")
    return PRESETS[name]


def preset_analyses(
    names: Optional[Sequence[str]] = None, preset: Union[str, Preset, None] = None
) -> List[Any]:
    """The named analyses (default: the runner's defaults), the built-ins configured by ``preset``.

    An analysis registered by a user under a built-in's name is built as registered."""
    from vit_embedding_lens.runner.analyses import BUILTIN_ANALYSES, DEFAULT_ANALYSES
    from vit_embedding_lens.runner.analysis import ANALYSES, build_analyses, check_analysis

    chosen = get_preset(preset)
    names = list(DEFAULT_ANALYSES if names is None else names)
    built = build_analyses(names)  # validates the names, registers the built-ins
    options = chosen.analysis_options()
    out = []
    for analysis in built:
        factory = ANALYSES[analysis.name]
        if analysis.name in options and factory is BUILTIN_ANALYSES.get(analysis.name):
            analysis = factory(**options[analysis.name])
            check_analysis(analysis)
        out.append(analysis)
    return out


def run_preset(
    model: Any,
    dataset: Any,
    out_dir: Union[str, Path],
    preset: Union[str, Preset, None] = None,
    analyses: Optional[Sequence[str]] = None,
    **kwargs: Any,
):
    """:func:`~vit_embedding_lens.runner.run_analyses` with the analyses of ``preset``; the preset
    is recorded in the run's configuration (``manifest.json``). The data set's token labels are
    the caller's: build it with ``token_labels=get_preset(preset).token_labels``."""
    from vit_embedding_lens.runner import run_analyses

    chosen = get_preset(preset)
    run_config = {**dict(kwargs.pop("run_config", None) or {}), "preset": chosen.as_dict()}
    return run_analyses(
        model,
        dataset,
        preset_analyses(analyses, chosen),
        out_dir,
        run_config=run_config,
        **kwargs,
    )
