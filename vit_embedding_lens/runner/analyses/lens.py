"""The class-embedding lens as a runner analysis (METHODS §1–§3, §5 class vs context).

Per image it stores the lens's per-token readings (:class:`~vit_embedding_lens.lens.LensResult`:
ranks of the correct class at every block's attention write-in, MLP write-in and residual stream,
change flags, composition bits), and with ``random_twin`` the residual-stream ranks of the
random-init twin on the same image. The readings are taken by hooks during the batch's shared
forward pass, so the analysis adds no forward pass of its own (the twin's pass is its own, by
necessity).

``lens="tuned"`` or ``"both"`` reads with a :class:`~vit_embedding_lens.lens.tuned.TunedClassLens`
too (``"both"``: the plain readings as before, plus ``tuned_*`` arrays; ``"tuned"``: the tuned
readings in place of the plain ones, without the random twin, whose basis the translators were not
fitted for), and stores per image and block the KL divergence of each lens's readout from the
model's output. The translators come from :func:`prepare_tuned_lens` (fitted on the run's own
images before the batch loop and saved in ``OUT/tuned_lens``, or loaded from a path), which also
runs the causal check once on a few of the run's images.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Optional, Tuple, Union, cast

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.lens.metrics import per_image_identifiability, summarize, token_groups
from vit_embedding_lens.lens.streaming import CHANGES, KINDS, LensRecorder, LensResult, lens_batch
from vit_embedding_lens.lens.tuned import TunedClassLens
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.runner.batch import Batch

STARS = (
    "Stars: one-sided paired Wilcoxon signed-rank test per block and token group that "
    "the trained model scores higher than its random-init twin on the same images; * "
    "p < 0.05, ** p < 0.01, *** p < 0.001, n.s. otherwise, with no correction for the "
    "many blocks and groups tested."
)

#: token groups drawn in the identifiability figure, when present
FIGURE_GROUPS = ("cls", "image", "class", "context")
#: the lenses the analysis reads with
LENS_CHOICES = ("plain", "tuned", "both")
#: the folder of the run's fitted translators and causal check
TUNED_DIR = "tuned_lens"
CAUSAL_FILE = "causal_check.csv"
#: images of the run the causal check ablates (the first ones)
CAUSAL_IMAGES = 64


class _Readers:
    """The lens's forward readers of one batch (plain and/or tuned recorder, readout KL)."""

    def __init__(self, readers: Dict[str, Any]) -> None:
        self.readers = readers

    def hooks(self) -> List[Tuple[str, Callable[..., Any]]]:
        return [hook for reader in self.readers.values() for hook in reader.hooks()]


class LensAnalysis(Analysis):
    """Identifiability per block and layer type, change rates, composition, class vs context, and
    (``random_twin=True``) the trained-vs-random-init comparison with one-sided Wilcoxon tests."""

    name = "lens"
    description = (
        "Projects every token of every block onto the class embeddings (the class-embedding lens) "
        "and scores how high the image's correct class ranks: 1 means top-1, 0.5 is chance. "
        "Read the identifiability figure from left to right: a curve climbing above its dashed "
        "random-init twin means the trained model writes class information into those tokens; "
        "the change-rate figure shows which sublayer (attention or MLP) raises the "
        "correct-class logit."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "identifiability": (
                "Violins: the distribution over images of each image's mean identifiability "
                "score s = 1 - rank/classes in the residual stream, per block and token group; "
                "solid line: the mean. Dashed line and shaded band (when the random-init twin was "
                "run): the mean and the 5th-95th percentile band of the same images through the "
                f"twin. Dotted: chance (0.5). {STARS} n = {n_images} images."
            ),
            "change_rates": (
                "Share of tokens whose correct-class logit rises across a block's attention (blue) "
                "or MLP (red) sublayer, CLS and image tokens apart; error bars: standard error of "
                f"the mean over images; dotted: 50 %. n = {n_images} images."
            ),
        }

    def __init__(
        self,
        random_twin: bool = True,
        twin_seed: int = 0,
        lens: str = "plain",
        tuned_lens: Union[TunedClassLens, str, Path, None] = None,
        causal: Optional[pd.DataFrame] = None,
    ) -> None:
        if lens not in LENS_CHOICES:
            raise ValueError(f"lens must be one of {LENS_CHOICES}, got {lens!r}")
        self.random_twin = random_twin
        self.twin_seed = twin_seed
        self.lens = lens
        #: the translators (a TunedClassLens, or a saved one's folder, loaded on first use)
        self.tuned_lens = tuned_lens
        #: the causal check's table (from :func:`prepare_tuned_lens`), reported as is
        self.causal = causal
        self._recorder: Optional[LensRecorder] = None
        self._tuned_recorder: Optional[LensRecorder] = None
        self._twin: Union[HookedViT, Literal[False], None] = None  # False: no twin for this model

    def config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = {
            "random_twin": self.random_twin,
            "twin_seed": self.twin_seed,
            "kinds": list(KINDS),
        }
        if self.lens != "plain":  # a plain run's fingerprint is what it always was
            config["lens"] = self.lens
            if isinstance(self.tuned_lens, TunedClassLens):
                config["translators"] = self.tuned_lens.file_digest()
            else:
                config["translators"] = None if self.tuned_lens is None else str(self.tuned_lens)
        return config

    def _tuned(self, model: HookedViT) -> TunedClassLens:
        if self.tuned_lens is None:
            raise ValueError(
                f"lens={self.lens!r} needs translators: pass tuned_lens (a TunedClassLens or a "
                "saved one's folder) or call prepare_tuned_lens before the run"
            )
        if not isinstance(self.tuned_lens, TunedClassLens):
            self.tuned_lens = TunedClassLens.load(self.tuned_lens, model)
        return self.tuned_lens

    def forward_reader(self, model: HookedViT, batch: Batch) -> Union[LensRecorder, _Readers]:
        """The lens's recorder, started on this batch's labels: its hooks read every block during
        the batch's shared forward pass, and :meth:`run` gets it back from the batch. With a tuned
        lens: the recorders of both lenses and the readout-KL reader together."""
        if self.lens == "plain":
            recorder = self._recorder_for(model)
            recorder.start(batch.labels)
            return recorder
        return self._readers(model, batch)

    def _readers(self, model: HookedViT, batch: Batch) -> _Readers:
        from vit_embedding_lens.lens.tuned_checks import ReadoutKLReader

        tuned = self._tuned(model)
        readers: Dict[str, Any] = {}
        if self.lens == "both":
            readers["plain"] = self._recorder_for(model)
        if self._tuned_recorder is None or self._tuned_recorder.model is not model:
            self._tuned_recorder = LensRecorder(model, lens=tuned)
        readers["tuned"] = self._tuned_recorder
        for name in ("plain", "tuned"):
            if name in readers:
                readers[name].start(batch.labels)
        readers["kl"] = ReadoutKLReader(model, {"plain": "plain", "tuned": tuned})
        readers["kl"].start()
        return _Readers(readers)

    def run(self, model: HookedViT, batch: Batch) -> Dict[str, np.ndarray]:
        if self.lens != "plain":
            return self._run_tuned(model, batch)
        recorder = batch.reader(model, self.name)
        if recorder is None:  # a batch the runner did not prepare: a forward pass of its own
            result = lens_batch(
                model, batch.images, batch.labels, recorder=self._recorder_for(model)
            )
        else:
            result = cast(LensRecorder, recorder).result
        return self._finish(model, batch, _to_arrays(result))

    def _run_tuned(self, model: HookedViT, batch: Batch) -> Dict[str, np.ndarray]:
        readers = cast(Optional[_Readers], batch.reader(model, self.name))
        if readers is None:  # a batch the runner did not prepare: a forward pass of its own
            readers = self._readers(model, batch)
            with torch.no_grad(), model.hooks(fwd_hooks=[(n, f) for n, f in readers.hooks()]):
                model(batch.images)
        parts = readers.readers
        tuned = _to_arrays(parts["tuned"].result)
        if self.lens == "both":
            out = _to_arrays(parts["plain"].result)
            out.update({f"tuned_{k}": v for k, v in tuned.items()})
        else:
            out = tuned
        for name, values in parts["kl"].result.items():
            out[f"kl_{name}"] = values.numpy()
        return self._finish(model, batch, out)

    def _finish(
        self, model: HookedViT, batch: Batch, out: Dict[str, np.ndarray]
    ) -> Dict[str, np.ndarray]:
        if batch.token_masks is not None:
            out["class_token"] = batch.token_masks.cpu().numpy()
        twin = self._twin_of(model) if self.random_twin and self.lens != "tuned" else None
        if twin is not None:
            out["random_rank_resid"] = (
                lens_batch(twin, batch.images, batch.labels).rank["resid"].numpy()
            )
        return out

    def _recorder_for(self, model: HookedViT) -> LensRecorder:
        """One recorder per model, built once (it holds the folded class projection)."""
        if self._recorder is None or self._recorder.model is not model:
            self._recorder = LensRecorder(model)
        return self._recorder

    def _twin_of(self, model: HookedViT) -> Optional[HookedViT]:
        """The random-init twin, built once; None (with one warning) when the architecture cannot be
        rebuilt from its name, so a long run goes on without the comparison instead of failing."""
        if self._twin is None:
            from vit_embedding_lens.lens.baseline import random_init_twin

            try:
                twin = random_init_twin(model, seed=self.twin_seed)
                twin.validate_inputs = False
                self._twin = twin
            except ValueError as err:
                warnings.warn(f"lens: no random-init comparison: {err}", stacklevel=2)
                self._twin = False
        return self._twin or None

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        result = from_arrays(results, model)
        random = None
        if "random_rank_resid" in results:
            random = from_arrays(results, model, rank_resid=results["random_rank_resid"])
        tables = summarize(result, random)
        if result.token_mask is not None:  # attention / MLP change: class vs context tokens
            from vit_embedding_lens.lens.group_tests import class_vs_context_changes

            tables["class_vs_context_changes"] = class_vs_context_changes(result)
        tables["per_image_scores"] = _per_image_scores(result, random)
        if self.lens != "plain":
            tables.update(self._tuned_tables(results, model, result))
        return tables

    def _tuned_tables(
        self, results: Dict[str, np.ndarray], model: HookedViT, primary: LensResult
    ) -> Dict[str, pd.DataFrame]:
        """Plain vs tuned: identifiability side by side, readout KL per block, the fit (held-out
        KL per block from the translators' card) and the causal check."""
        from vit_embedding_lens.lens.tuned_checks import identifiability_comparison, kl_table

        if self.lens == "both":
            tuned = from_arrays(results, model, prefix="tuned_")
            compared = {"plain": primary, "tuned": tuned}
        else:
            compared = {"tuned": primary}
        tables = {
            "lens_identifiability": identifiability_comparison(compared),
            "lens_kl": kl_table(
                {name: torch.from_numpy(results[f"kl_{name}"]) for name in ("plain", "tuned")}
            ),
        }
        tuned_lens = self._tuned(model)
        card = tuned_lens.card
        if "heldout_kl_tuned" in card:
            tables["tuned_lens_fit"] = pd.DataFrame(
                dict(
                    block=range(len(card["heldout_kl_tuned"])),
                    heldout_kl_plain=card["heldout_kl_plain"],
                    heldout_kl_tuned=card["heldout_kl_tuned"],
                )
            )
        if self.causal is not None:
            tables["lens_causal"] = self.causal
        return tables

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.viz import (
            plot_change_rates,
            plot_identifiability_evolution,
            plot_lens_comparison,
        )

        scores = tables["per_image_scores"]
        trained = scores[scores["model"] == "trained"]
        random = scores[scores["model"] == "random init"]
        pvalues = None
        if "trained_vs_random" in tables:
            pvalues = tables["trained_vs_random"].rename(columns={"token_group": "group"})[
                ["block", "group", "p_value"]
            ]
        figures = {
            "identifiability": plot_identifiability_evolution(
                trained,
                random if len(random) else None,
                pvalues,
                title=f"class identifiability, {model.cfg.model_name}",
            )
        }
        changes = tables["change_rates"]
        changes = changes[
            changes["comparison"].isin(["attn", "mlp"])
            & changes["token_group"].isin(["cls", "image"])
        ]
        figures["change_rates"] = plot_change_rates(
            changes,
            sublayer_col="comparison",
            group_col="token_group",
            value_col="value",
            percent=True,
            title="tokens whose correct-class logit rises, attention vs MLP",
        )
        if "lens_identifiability" in tables:
            figures["lens_comparison"] = plot_lens_comparison(
                tables["lens_identifiability"],
                tables.get("lens_kl"),
                title=f"plain vs tuned class lens, {model.cfg.model_name}",
            )
        return figures

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """% identifiable residual-stream tokens per block and token group, for the terminal."""
        t = tables["identifiability"]
        t = t[(t["layer_type"] == "resid") & (t["metric"] == "identifiable_pct")]
        wide = t.pivot(index="block", columns="token_group", values="value").round(1)
        wide.columns = [f"% {c} identifiable" for c in wide.columns]
        return wide.reset_index()


def _to_arrays(result: LensResult) -> Dict[str, np.ndarray]:
    out = {f"rank_{k}": v.numpy() for k, v in result.rank.items()}
    out.update({f"rose_{k}": v.numpy() for k, v in result.rose.items()})
    out["composition"] = result.composition.numpy()
    return out  # the runner stores each image's label beside them (results["label"])


def from_arrays(
    results: Dict[str, np.ndarray],
    model: HookedViT,
    rank_resid: Optional[np.ndarray] = None,
    prefix: str = "",
) -> LensResult:
    """A :class:`LensResult` from the stored per-image arrays (``rank_resid`` swaps in another
    model's residual ranks, e.g. the random twin's, keeping everything else; ``prefix="tuned_"``
    reads the tuned lens's arrays of a ``lens="both"`` run)."""
    p = prefix
    rank = {k: torch.from_numpy(np.ascontiguousarray(results[f"{p}rank_{k}"])) for k in KINDS}
    if rank_resid is not None:
        rank["resid"] = torch.from_numpy(np.ascontiguousarray(rank_resid))
    mask = results.get("class_token")
    return LensResult(
        rank=rank,
        rose={k: torch.from_numpy(np.ascontiguousarray(results[f"{p}rose_{k}"])) for k in CHANGES},
        composition=torch.from_numpy(np.ascontiguousarray(results[f"{p}composition"])),
        labels=torch.from_numpy(np.ascontiguousarray(results["label"])).long(),
        n_classes=model.cfg.n_classes,
        layout=model.layout,
        token_mask=None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).bool(),
        class_names=model.class_names,
    )


def _per_image_scores(result: LensResult, random: Optional[LensResult]) -> pd.DataFrame:
    """Per image × block × token group: the mean residual-stream score (the distributions drawn)."""
    frames = []
    groups = [g for g in FIGURE_GROUPS if g in token_groups(result)]
    for label, res in (("trained", result), ("random init", random)):
        if res is None:
            continue
        for group in groups:
            if label == "random init" and group in ("class", "context"):
                continue
            scores = per_image_identifiability(res, "resid", group).numpy()  # [image, block]
            image, block = np.meshgrid(
                np.arange(scores.shape[0]), np.arange(scores.shape[1]), indexing="ij"
            )
            keep = ~np.isnan(scores.ravel())
            frames.append(
                pd.DataFrame(
                    dict(
                        model=label,
                        image=image.ravel()[keep],
                        block=block.ravel()[keep],
                        group=group,
                        score=scores.ravel()[keep],
                    )
                )
            )
    return pd.concat(frames, ignore_index=True)


def prepare_tuned_lens(
    model: HookedViT,
    dataset: Any,
    out_dir: Union[str, Path],
    *,
    path: Union[str, Path, None] = None,
    batch_size: int = 32,
    refit: bool = False,
    progress: bool = True,
    save: bool = True,
    causal_images: int = CAUSAL_IMAGES,
    **fit_options: Any,
) -> Tuple[TunedClassLens, pd.DataFrame]:
    """The translators of a run and their causal check, before the batch loop.

    ``path``: load saved translators (checked against ``model``). Otherwise ``OUT/tuned_lens``
    is loaded when a previous attempt saved it (so a resumed run reads with the same translators,
    bit for bit), else the translators are fitted on the run's own images
    (:meth:`TunedClassLens.fit`, ``fit_options``) and saved there (``refit`` fits anew). The causal
    check (:func:`~vit_embedding_lens.lens.tuned_checks.causal_check`) runs on the first
    ``causal_images`` images and is kept beside the fitted translators in
    ``OUT/tuned_lens/causal_check.csv`` (with ``path``, it is recomputed, seeded, each time)."""
    from torch.utils.data import DataLoader

    from vit_embedding_lens.lens.tuned_checks import causal_check
    from vit_embedding_lens.runner.batch import collate

    folder = Path(out_dir) / TUNED_DIR
    param = next(model.parameters())

    def loader(n: Optional[int] = None) -> Any:
        data = dataset
        if n is not None:
            from torch.utils.data import Subset

            data = Subset(dataset, range(min(n, len(dataset))))
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)

    reused = False  # the folder's translators (and so its causal check) are this run's
    if path is not None:
        lens = TunedClassLens.load(path, model)
    elif (folder / "card.json").is_file() and not refit:
        lens, reused = TunedClassLens.load(folder, model), True
    else:
        lens = TunedClassLens.fit(
            model,
            loader(),
            progress=progress,
            data=f"{len(dataset)} images of the run ({type(dataset).__name__})",
            **fit_options,
        )
        if save:
            lens.save(folder)
    causal_file = folder / CAUSAL_FILE
    if reused and causal_file.is_file():
        causal = pd.read_csv(causal_file)
    else:
        batches = [b.images for b in loader(causal_images) if len(b)]
        images = torch.cat(batches).to(device=param.device, dtype=param.dtype)
        causal = causal_check(model, images, lens)
        if save and path is None:  # saved translators elsewhere: recomputed (seeded) each time
            folder.mkdir(parents=True, exist_ok=True)
            causal.to_csv(causal_file, index=False)
    return lens, causal
