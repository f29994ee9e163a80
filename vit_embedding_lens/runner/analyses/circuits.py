"""Circuits as a runner analysis (METHODS §10): the edges that carry one class decision, the
minimal circuit that recovers a target share of it, and its faithfulness curve over the data set.

Two steps, so that a run resumes and gives the same numbers for any batch size:

1. :meth:`CircuitsAnalysis.prepare` (before the batch loop; ``vit-lens`` calls it) scores every
   edge with EAP or EAP-IG (:func:`~vit_embedding_lens.circuits.edge_attribution`) on the first
   ``images`` images of class ``A`` and their counterfactuals, and finds the minimal circuit for
   ``target`` (:func:`~vit_embedding_lens.circuits.discover_circuit`). Both are saved in
   ``OUT/circuits`` and read back when the run resumes, so every batch runs the same circuits.
2. Per batch, every image of class ``A`` is run, alone, through the full model, the fully
   ablated model, the top-``n`` circuits of the curve, random circuits of the same sizes and the
   minimal circuit (:func:`~vit_embedding_lens.circuits.run_circuits`: real forward passes with the
   edges outside the circuit ablated). The per-image metrics are stored; other images get NaN.

``summarize`` averages the metrics over the images and turns them into faithfulness
``(m(C) − m(∅)) / (m(full) − m(∅))`` of the means. The counterfactual of an image depends only on
its data set index (never on which images share its batch): ``pair`` takes the
``index mod k``-th of ``k`` images of the other class(es) (gathered by :meth:`prepare`),
``noise`` is seeded by the index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vit_embedding_lens.runner.analysis import Analysis
from vit_embedding_lens.runner.manifest import ConfigMismatchError

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: the counterfactuals: images of the other class(es), a corruption of the image's own patches,
#: or mean ablation (every ablated sender outputs its mean over the discovery images)
CORRUPTIONS = ("pair", "noise", "blur", "mean", "swap", "mean-ablation")
METHODS = ("eap", "eap-ig")
#: ``classes=(A, REST)``: class A against its strongest other class
REST = "rest"
CIRCUITS_DIR = "circuits"
SCORES_FILE = "edge_scores.csv"
CIRCUIT_FILE = "circuit.csv"
CARD_FILE = "card.json"


@dataclass
class CircuitDiscovery:
    """What :meth:`CircuitsAnalysis.prepare` found: the edge scores, the minimal circuit's edges
    and its numbers (``card``: classes, options, faithfulness on the discovery images ...), and
    the counterfactual reference images."""

    scores: pd.DataFrame
    circuit: pd.DataFrame
    card: Dict[str, Any]
    references: Tensor
    ablation: Any = None

    def fingerprint(self) -> str:
        """A hash of the scores and the circuit (enters the run's configuration)."""
        digest = hashlib.sha256()
        digest.update(self.scores[["sender", "receiver", "group"]].to_csv(index=False).encode())
        digest.update(np.round(self.scores["score"].to_numpy(dtype=float), 10).tobytes())
        digest.update(self.circuit[["sender", "receiver", "group"]].to_csv(index=False).encode())
        return digest.hexdigest()[:16]


def parse_classes(classes: Any) -> Tuple[Union[int, str, None], Union[int, str, None]]:
    """``"A,B"`` / ``(A, B)`` / ``(A, "rest")`` -> the two entries (ints where they are digits);
    None -> the first two classes. A class pair with one class twice is refused."""
    if classes is None:
        return None, None
    parts: List[Any] = classes.split(",") if isinstance(classes, str) else list(classes)
    parts = [p.strip() if isinstance(p, str) else p for p in parts]
    if len(parts) != 2 or any(p is None or p == "" for p in parts):
        raise ValueError(f"classes must be two classes, A,B (or A,rest), got {classes!r}")
    parts = [int(p) if isinstance(p, str) and p.isdigit() else p for p in parts]
    if parts[0] == REST:
        raise ValueError(f"classes {classes!r}: 'rest' stands for the other classes; put it second")
    if parts[0] == parts[1]:
        raise ValueError(f"classes {classes!r}: a class pair needs two different classes")
    return parts[0], parts[1]


class CircuitsAnalysis(Analysis):
    """Per image of class ``A``: ``metric_full``, ``metric_empty``, ``metric_minimal`` and
    ``metric_top [size]``, ``metric_random [seed, size]`` (the metric with every edge outside the
    circuit ablated; NaN for the other images).

    Tables: ``edge_scores`` (every edge, by ``|score|``), ``circuit`` (the minimal circuit's
    edges), ``faithfulness`` (the curve: ``n_edges``, ``faithfulness``, ``metric``, ``kind``,
    ``seed``) and ``summary`` (one row). Figures: the circuit graph (interactive in the report)
    and the faithfulness curve.

    ``classes``: ``"A,B"`` (logit difference A − B; counterfactuals of the ``pair`` corruption are
    images of B) or ``"A,rest"`` (A minus its strongest other class; counterfactuals: images of
    any other class), by index or name; default: classes 0 and 1. ``corruption``: one of
    :data:`CORRUPTIONS`. ``method``: ``"eap"`` or ``"eap-ig"`` (``steps`` points). ``target``: the
    share of the metric the minimal circuit recovers, in (0, 1]. ``images``: images of A the
    edges are scored on (and counterfactual references gathered). ``sizes``: the curve's circuit
    sizes (default: 0 and about 16 sizes geometrically up to every edge); ``n_random``: random
    circuits per size. ``tokens``: token groups that split every edge (see
    :func:`~vit_embedding_lens.circuits.token_groups`).
    """

    name = "circuits"
    description = (
        "The circuit that carries one class decision: every edge between components (the "
        "embeddings, each attention head, each MLP, the logits) is scored by edge attribution "
        "patching on counterfactual pairs, the fewest top edges that recover the target share of "
        "the metric form the minimal circuit, and its faithfulness is measured by running it: "
        "every edge outside it ablated in a real forward pass, on every image of the class. "
        "Faithfulness 1 is the full model's metric, 0 the fully ablated one; random circuits of "
        "the same size are the baseline."
    )

    def __init__(
        self,
        classes: Any = None,
        corruption: str = "pair",
        method: str = "eap-ig",
        target: float = 0.8,
        images: int = 32,
        sizes: Optional[Sequence[int]] = None,
        n_random: int = 3,
        steps: int = 5,
        tokens: Any = "all",
        seed: int = 0,
    ) -> None:
        self.classes = parse_classes(classes)
        if corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {corruption!r}; use one of {CORRUPTIONS}")
        if method not in METHODS:
            raise ValueError(f"unknown edge method {method!r}; use one of {METHODS}")
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise ValueError(f"target must be a share of the metric in (0, 1], got {target!r}")
        if not 0.0 < float(target) <= 1.0:
            raise ValueError(f"target {target} is not a share of the metric in (0, 1]")
        if int(images) < 1:
            raise ValueError(f"images must be at least 1, got {images}")
        if int(n_random) < 0:
            raise ValueError(f"n_random must be 0 or more, got {n_random}")
        self.corruption, self.method, self.target = corruption, method, float(target)
        self.images, self.n_random, self.steps = int(images), int(n_random), int(steps)
        self.sizes = None if sizes is None else [int(s) for s in sizes]
        self.tokens, self.seed = tokens, int(seed)
        self.discovery: Optional[CircuitDiscovery] = None
        self._ids: Optional[Tuple[int, Optional[int]]] = None

    def options(self) -> Dict[str, Any]:
        """The constructor's keyword arguments (to rebuild the analysis with some changed)."""
        a, b = self.classes
        return {
            "classes": None if a is None else (a, b),
            "corruption": self.corruption,
            "method": self.method,
            "target": self.target,
            "images": self.images,
            "sizes": self.sizes,
            "n_random": self.n_random,
            "steps": self.steps,
            "tokens": self.tokens,
            "seed": self.seed,
        }

    def config(self) -> Dict[str, Any]:
        options = self._plain_options()
        options["discovery"] = None if self.discovery is None else self.discovery.fingerprint()
        return options

    def _plain_options(self) -> Dict[str, Any]:
        options = dict(self.options())
        options["classes"] = [str(c) for c in self.classes]
        options["tokens"] = json.loads(json.dumps(self.tokens, default=str))
        return options

    # ---------------------------------------------------------------------------------------------
    # Classes, counterfactuals, metric
    # ---------------------------------------------------------------------------------------------
    def class_ids(self, model: HookedViT) -> Tuple[int, Optional[int]]:
        """``(A, B)`` as class indices (``B`` None for ``"rest"``)."""
        a, b = self.classes
        if a is None:
            if model.cfg.n_classes < 2:
                raise ValueError("circuits need a model with at least two classes")
            return 0, 1
        first = model.to_single_token(a)
        second = None if b is None or b == REST else model.to_single_token(b)
        if first == second:
            raise ValueError(f"classes {self.classes}: both name class {first}")
        return first, second

    def _is_other(self, labels: Tensor, a: int, b: Optional[int]) -> Tensor:
        return labels != a if b is None else labels == b

    def _metric(self, model: HookedViT, a: int, b: Optional[int]) -> Any:
        from vit_embedding_lens.interventions.metrics import ClassSpaceMetric

        return ClassSpaceMetric(model, "logit_diff", a, other=b)

    def _counterfactual(self, model: HookedViT, image: Tensor, index: int) -> Any:
        """The counterfactual of one clean image ``[1, C, H, W]`` at data set position
        ``index``: the same for any batch."""
        from vit_embedding_lens.circuits import corrupt_patches

        assert self.discovery is not None
        refs = self.discovery.references
        if self.corruption == "mean-ablation":
            return self.discovery.ablation
        reference = refs[index % len(refs)][None].to(image.device, image.dtype)
        if self.corruption == "pair":
            return reference
        return corrupt_patches(
            model,
            image,
            "image",
            self.corruption,  # type: ignore[arg-type]
            source=reference if self.corruption == "swap" else None,
            seed=self.seed + int(index),
        )

    # ---------------------------------------------------------------------------------------------
    # Discovery
    # ---------------------------------------------------------------------------------------------
    def prepare(
        self,
        model: HookedViT,
        dataset: Any,
        out_dir: Union[str, Path, None] = None,
        *,
        batch_size: int = 32,
        rescore: bool = False,
        save: bool = True,
        progress: bool = False,
    ) -> CircuitDiscovery:
        """Score the edges and find the minimal circuit on the first ``images`` images of class A
        in ``dataset`` (see the module docstring); with ``out_dir``, read ``OUT/circuits`` when a
        previous attempt saved it with the same options (``rescore``: score anew), else save
        there. Returns the :class:`CircuitDiscovery` the batches will run."""
        from torch.utils.data import DataLoader

        from vit_embedding_lens.circuits import (
            ablation_reference,
            discover_circuit,
            edge_attribution,
        )
        from vit_embedding_lens.runner.batch import collate

        a, b = self.class_ids(model)
        self._ids = (a, b)
        param = next(model.parameters())
        clean: List[Tensor] = []
        clean_index: List[int] = []
        refs: List[Tensor] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        for batch in loader:
            if not len(batch):
                continue
            for image, label, index in zip(batch.images, batch.labels, batch.indices):
                if int(label) == a and len(clean) < self.images:
                    clean.append(image)
                    clean_index.append(int(index))
                elif self._is_other(label[None], a, b)[0] and len(refs) < self.images:
                    refs.append(image)
            if len(clean) >= self.images and len(refs) >= self.images:
                break
        what = f"class {b}" if b is not None else f"classes other than {a}"
        if not clean:
            raise ValueError(f"the data set has no image of class {a}: no circuit to find")
        if not refs:
            raise ValueError(f"the data set has no image of {what}: no counterfactual images")
        references = torch.stack(refs)
        images = torch.stack(clean).to(device=param.device, dtype=param.dtype)
        ablation = None
        if self.corruption == "mean-ablation":
            pool = torch.cat([images, references.to(images.device, images.dtype)])
            ablation = ablation_reference(model, pool, "mean")
        # the counterfactuals need only the references: a discovery without scores yet
        self.discovery = CircuitDiscovery(
            pd.DataFrame(columns=["sender", "receiver", "group", "score"]),
            pd.DataFrame(columns=["sender", "receiver", "group"]),
            {},
            references,
            ablation,
        )
        card = {
            "classes": [a, b],
            "options": self._plain_options(),
            "n_images": len(clean),
            "image_indices": clean_index,
        }
        folder = None if out_dir is None else Path(out_dir) / CIRCUITS_DIR
        if folder is not None and not rescore and (folder / CARD_FILE).is_file():
            saved = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
            if {k: saved.get(k) for k in card} != json.loads(json.dumps(card)):
                # refused before any scoring: the folder's run and its circuit stay as they are
                raise ConfigMismatchError(
                    f"{folder} holds the circuit of another configuration or other images "
                    f"({_card_differences(saved, card)}); resuming would mix them. Rerun with "
                    "--overwrite (rescore=True) or another --out."
                )
            scores = pd.read_csv(folder / SCORES_FILE, keep_default_na=False)
            circuit = pd.read_csv(folder / CIRCUIT_FILE, keep_default_na=False)
            self.discovery = CircuitDiscovery(scores, circuit, saved, references, ablation)
            return self.discovery
        corrupt = torch.cat(
            [
                self._as_images(self._counterfactual(model, img[None], idx), img[None])
                for img, idx in zip(images, clean_index)
            ]
        )
        counterfactual: Any = ablation if self.corruption == "mean-ablation" else corrupt
        metric = self._metric(model, a, b)
        scores = edge_attribution(
            model,
            images,
            counterfactual,
            metric,
            tokens=self.tokens,
            method=self.method,  # type: ignore[arg-type]
            steps=self.steps,
            progress=progress,
        )
        found = discover_circuit(
            model, images, counterfactual, metric, scores, target=self.target, tokens=self.tokens
        )
        scores = scores.sort_values("abs_score", ascending=False, kind="stable", ignore_index=True)
        card.update(
            circuit={k: _plain(v) for k, v in found.summary().items()},
            k=_plain(found.metadata.get("k")),
        )
        self.discovery = CircuitDiscovery(scores, found.edges, card, references, ablation)
        if folder is not None and save:
            folder.mkdir(parents=True, exist_ok=True)
            scores.to_csv(folder / SCORES_FILE, index=False)
            found.edges.to_csv(folder / CIRCUIT_FILE, index=False)
            (folder / CARD_FILE).write_text(json.dumps(card, indent=1), encoding="utf-8")
        return self.discovery

    @staticmethod
    def _as_images(counterfactual: Any, like: Tensor) -> Tensor:
        return counterfactual if isinstance(counterfactual, Tensor) else like

    def _sizes(self) -> List[int]:
        from vit_embedding_lens.circuits.circuit import default_sizes

        assert self.discovery is not None
        n_edges = len(self.discovery.scores)
        sizes = default_sizes(n_edges) if self.sizes is None else list(self.sizes)
        bad = [s for s in sizes if not 0 <= s <= n_edges]
        if bad:
            raise ValueError(f"circuit sizes must be between 0 and {n_edges} edges, got {bad}")
        # the minimal circuit's size, so that random circuits of its size are run too
        return sorted(set(sizes) | {len(self.discovery.circuit)})

    # ---------------------------------------------------------------------------------------------
    # Per batch
    # ---------------------------------------------------------------------------------------------
    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        from vit_embedding_lens.circuits import faithfulness_curve, run_circuits

        if self.discovery is None or self._ids is None:
            raise RuntimeError(
                "the circuits analysis scores its edges before the run: call "
                "analysis.prepare(model, dataset, out_dir) first (vit-lens analyze/demo does)"
            )
        a, b = self._ids
        sizes = self._sizes()
        n = len(batch)
        full = np.full(n, np.nan)
        empty = np.full(n, np.nan)
        minimal = np.full(n, np.nan)
        top = np.full((n, len(sizes)), np.nan)
        random = np.full((n, self.n_random, len(sizes)), np.nan)
        metric = self._metric(model, a, b)
        scores = self.discovery.scores
        for i in torch.nonzero(batch.labels == a).flatten().tolist():
            image = batch.images[i : i + 1]
            corrupt = self._counterfactual(model, image, int(batch.indices[i]))
            curve = faithfulness_curve(
                model,
                image,
                corrupt,
                metric,
                scores,
                sizes=sizes,
                n_random=self.n_random,
                seed=self.seed,
                tokens=self.tokens,
            )
            full[i], empty[i] = curve.attrs["metric_clean"], curve.attrs["metric_ablated"]
            top[i] = curve.loc[curve["kind"] == "top", "metric"].to_numpy()
            if self.n_random:
                rand = curve.loc[curve["kind"] == "random", "metric"].to_numpy()
                random[i] = rand.reshape(self.n_random, len(sizes))
            (minimal[i],) = run_circuits(
                model, image, corrupt, metric, [self.discovery.circuit], tokens=self.tokens
            )
        return {
            "metric_full": full,
            "metric_empty": empty,
            "metric_minimal": minimal,
            "metric_top": top,
            "metric_random": random,
        }

    # ---------------------------------------------------------------------------------------------
    # Tables and figures
    # ---------------------------------------------------------------------------------------------
    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        from vit_embedding_lens.circuits import faithfulness

        if self.discovery is None:
            raise RuntimeError(
                "summarize needs the run's discovery: call analysis.prepare(model, dataset, "
                "out_dir) (it reads OUT/circuits back)"
            )
        sizes = self._sizes()
        used = ~np.isnan(results["metric_full"])
        n_used = int(used.sum())
        if n_used == 0:
            raise ValueError(
                f"no image of class {self.class_ids(model)[0]} in the run: no faithfulness to "
                "measure"
            )
        full = float(results["metric_full"][used].mean())
        empty = float(results["metric_empty"][used].mean())
        rows = []
        top = results["metric_top"][used].mean(0)
        if len(top) != len(sizes):
            raise ValueError(
                f"the stored results have {len(top)} circuit sizes but this analysis has "
                f"{len(sizes)}; summarize with the configuration the run used"
            )
        for k, value in zip(sizes, top):
            rows.append(dict(n_edges=k, metric=float(value), kind="top", seed=-1))
        random = results["metric_random"][used].mean(0)
        for r in range(random.shape[0]):
            for k, value in zip(sizes, random[r]):
                rows.append(dict(n_edges=k, metric=float(value), kind="random", seed=self.seed + r))
        curve = pd.DataFrame(rows)
        curve.insert(1, "faithfulness", [faithfulness(m, full, empty) for m in curve["metric"]])
        curve["n_images"] = n_used
        a, b = self.class_ids(model)
        names = _names(model)
        m_min = float(results["metric_minimal"][used].mean())
        circuit = self.discovery.circuit
        same_size = curve[(curve["kind"] == "random") & (curve["n_edges"] == len(circuit))]
        summary = pd.DataFrame(
            [
                {
                    "classes": f"{names[a]} vs {names[b] if b is not None else 'rest'}",
                    "corruption": self.corruption,
                    "method": self.method,
                    "target": self.target,
                    "n_edges": len(circuit),
                    "of_edges": len(self.discovery.scores),
                    "faithfulness": faithfulness(m_min, full, empty),
                    "faithfulness_discovery": self.discovery.card.get("circuit", {}).get(
                        "faithfulness"
                    ),
                    "random_same_size": (
                        float(same_size["faithfulness"].mean()) if len(same_size) else np.nan
                    ),
                    "metric_full": full,
                    "metric_empty": empty,
                    "metric_circuit": m_min,
                    "n_images": n_used,
                    "n_discovery_images": self.discovery.card.get("n_images"),
                }
            ]
        )
        return {
            "summary": summary,
            "faithfulness": curve,
            "circuit": circuit.reset_index(drop=True),
            "edge_scores": self.discovery.scores,
        }

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.viz.circuit import circuit_view, plot_faithfulness_curve

        summary = tables["summary"].iloc[0]
        title = (
            f"circuit for {summary['classes']}: {summary['n_edges']} edges, faithfulness "
            f"{summary['faithfulness']:.2f}"
        )
        graph = circuit_view(
            tables["circuit"], n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads, title=title
        )
        curve = plot_faithfulness_curve(
            tables["faithfulness"],
            target=self.target,
            minimal=int(summary["n_edges"]),
            minimal_faithfulness=float(summary["faithfulness"]),
            title=f"faithfulness by circuit size ({summary['classes']}, {self.method})",
        )
        return {"circuit": graph, "faithfulness": curve}

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        n = int(tables["summary"]["n_images"].iloc[0]) if "summary" in tables else "?"
        return {
            "circuit": (
                "The minimal circuit as a graph over blocks (columns: embeddings, then per block "
                "its heads A and MLP M, then the logits). Node colour: the component's kind; edge "
                "width: |EAP score|, dashed where the score is negative; edge colour: the token "
                "group. Hover an edge for its score; grey dots are components outside the circuit."
            ),
            "faithfulness": (
                "Faithfulness (share of the metric recovered, from the mean metric over images) "
                "of the top-n circuits and of random circuits of the same sizes (mean over seeds, "
                f"min-max band), each run with the other edges ablated; dashed: the target; star: "
                f"the minimal circuit's size on the discovery images. n = {n} images of the class "
                f"(of {n_images} in the run)."
            ),
        }

    def notes(self, tables: Dict[str, pd.DataFrame]) -> List[str]:
        if "summary" not in tables:
            return []
        row = tables["summary"].iloc[0]
        found = []
        if np.isfinite(row["faithfulness"]) and row["faithfulness"] < row["target"]:
            found.append(
                f"The minimal circuit recovers {row['faithfulness']:.0%} of the metric over the "
                f"run's images, below the target {row['target']:.0%} it reached on the "
                f"{row['n_discovery_images']} discovery images: it does not carry the decision as "
                "well on the other images of the class."
            )
        return found

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        cols = ["classes", "n_edges", "of_edges", "faithfulness", "random_same_size", "n_images"]
        return tables["summary"][cols]


def _card_differences(saved: Dict[str, Any], card: Dict[str, Any]) -> str:
    """The settings in which a saved discovery's card differs from this one, for the error."""
    now, then = json.loads(json.dumps(card)), saved
    options = [
        f"{k}: {then.get('options', {}).get(k)!r} there, {v!r} now"
        for k, v in now["options"].items()
        if then.get("options", {}).get(k) != v
    ]
    others = [k for k in ("classes", "n_images", "image_indices") if then.get(k) != now[k]]
    return "; ".join(options + [f"{k} differ" for k in others]) or "unknown differences"


def _names(model: HookedViT) -> List[str]:
    from vit_embedding_lens.runner.analyses._common import class_names

    return class_names(model)


def _plain(value: Any) -> Any:
    """A JSON-friendly value (numpy scalars to Python, NaN kept as None)."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    return value
