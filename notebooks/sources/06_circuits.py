# %% [markdown]
# # 06 · Circuits: which components and connections carry a class decision
#
# A *circuit* is a subgraph of the model: the edges between its components (the embeddings, each
# attention head, each MLP, the class readout) that carry one decision. This notebook, with
# `vit_embedding_lens.circuits` and `vit_embedding_lens.viz.circuit`, on the bundled MNIST ViT and
# then on the bundled Fashion-MNIST ViT:
#
# 1. counterfactual pairs: images of one class (clean) against images of another (corrupt), and the
#    logit difference of the two classes as the metric;
# 2. edge attribution patching (EAP, EAP-IG): a score for every edge from one forward and backward
#    pass;
# 3. circuit discovery: the fewest top edges that recover 80 % of the metric, checked by *running*
#    the circuit (every other edge ablated in a real forward pass);
# 4. the faithfulness curve against random circuits of the same size;
# 5. the circuit drawn: interactive (plotly, offline) and static (matplotlib, for papers);
# 6. edges split by token groups (CLS, the object's tokens, the rest);
# 7. two garments in the Fashion model, and the same analysis from the command line.
#
# Definitions: docs, *Concepts → Circuits*. Offline, CPU only.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import pandas as pd
import torch

from vit_embedding_lens import HookedViT, circuits, viz
from vit_embedding_lens.zoo import load_bundled_eval

torch.manual_seed(0)
pd.set_option("display.width", 120)
pd.set_option("display.precision", 3)

model = HookedViT.from_bundled("mnist-vit")
digits = load_bundled_eval("mnist-vit")
cfg = model.cfg
print(f"{cfg.n_layers} blocks x {cfg.n_heads} heads; {len(digits)} held-out digits")

# %% [markdown]
# ## 1. Counterfactual pairs
#
# `class_pairs(images, labels, target, other, n=...)` pairs images of the target class (clean)
# with images of the other class (corrupt), drawn by label. Here 3s against 8s: the metric is the
# logit difference *logit(3) − logit(8)*, averaged over the pairs (`pairs.metric(model)`). It is
# high on the clean images and negative on the corrupt ones; a circuit must carry that difference.
# `patch_pairs` corrupts an image's own patches instead (noise, blur, mean colour, swap), and
# `ablation_reference` gives mean or resample ablation over a data set.

# %%
masks = digits.class_token_mask(model.layout)  # True on the digit's strokes (for token groups)
pairs = circuits.class_pairs(digits.images, digits.labels, 3, 8, n=8, object_masks=masks)
metric = pairs.metric(model)
with torch.no_grad():
    clean, corrupt = float(metric(model(pairs.clean))), float(metric(model(pairs.corrupt)))
print(f"{len(pairs)} pairs; logit(3) - logit(8): clean {clean:.2f}, corrupt {corrupt:.2f}")

# %% [markdown]
# ## 2. Edge attribution patching
#
# The edge *u → v* scores *(a_u(corrupt) − a_u(clean)) · ∂m/∂(input of v)*: the first-order change
# of the metric if *v* alone saw *u*'s corrupt output. EAP takes the gradient at the clean images;
# EAP-IG averages it over points between clean and corrupt (integrated gradients), which fixes
# EAP where the metric saturates. The table has one row per edge (460 in this 6-block, 4-head
# model). A negative score means ablating the edge lowers the metric: the edge helps the 3.

# %%
eap = circuits.edge_attribution(model, pairs.clean, pairs.corrupt, metric, method="eap")
scores = circuits.edge_attribution(model, pairs.clean, pairs.corrupt, metric, method="eap-ig")
both = eap.merge(scores, on=["sender", "receiver", "group"], suffixes=("_eap", "_ig"))
rho = circuits.spearman(both["score_eap"], both["score_ig"])
print(f"{len(scores)} edges; Spearman rank correlation of EAP and EAP-IG scores: {rho:.2f}")
scores.sort_values("abs_score", ascending=False)[["sender", "receiver", "score"]].head(8)

# %% [markdown]
# ## 3. Discovery: the minimal circuit
#
# `discover_circuit` keeps the top edges by |score| until the circuit recovers the target share
# of the metric, measured by running it: faithfulness *(m(C) − m(∅)) / (m(full) − m(∅))*, where
# *m(∅)* is the run with every edge ablated (here: the corrupt images) and *m(full)* the clean run.
# Edges left dangling (no kept path from the embeddings, or to the logits) are pruned.

# %%
circuit = circuits.discover_circuit(model, pairs.clean, pairs.corrupt, metric, scores, target=0.8)
print(circuit)
pd.DataFrame([circuit.summary()])

# %% [markdown]
# ## 4. The faithfulness curve
#
# Circuits of growing size, the top edges against random edges of the same number (three seeds:
# the mean and a min-max band). The top edges recover the metric with far fewer edges than random
# ones; the star is the minimal circuit of section 3.

# %%
curve = circuits.faithfulness_curve(model, pairs.clean, pairs.corrupt, metric, scores, n_random=3)
viz.plot_faithfulness_curve(
    curve,
    target=0.8,
    minimal=circuit.n_edges,
    minimal_faithfulness=circuit.faithfulness,
    title="3 vs 8: faithfulness by circuit size",
)

# %% [markdown]
# ## 5. The circuit, drawn
#
# Columns are the computation order: the embeddings, then per block its heads (A) and its MLP (M),
# then the logits; a block's heads are stacked, head 0 on top. Node colour is the component's kind
# (the library's palette), node size its summed |score|; edge width is |score|, dashed when the
# score is negative. The interactive view (hover an edge for its score, zoom, toggle groups in the
# legend) carries plotly.js inline, so it works offline and in a saved `.html`
# (`view.save("circuit.html")`); `.figure()` is the static figure. Grey dots are components
# outside the circuit.

# %%
view = viz.circuit_view(
    circuit, n_layers=cfg.n_layers, n_heads=cfg.n_heads, title="MNIST: the 3 vs 8 circuit"
)
view

# %% [markdown]
# Most of the small model takes part: a distributed circuit. For a paper figure, `max_edges`
# draws the strongest edges only (the title says how many of how many).

# %%
viz.plot_circuit(circuit, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_edges=40)

# %% [markdown]
# ## 6. Edges split by token groups
#
# With `tokens=`, every edge is split by the tokens it carries: here the CLS token, the tokens on
# the digit's strokes (`"object"`, from the masks) and the rest (the background). The circuit
# keeps each group's edge on its own; the edge colour in the figures is the token group.

# %%
groups = dict(tokens=["cls", "object"], object_mask=pairs.object_mask)
split = circuits.edge_attribution(model, pairs.clean, pairs.corrupt, metric, method="eap", **groups)
by_group = circuits.discover_circuit(
    model, pairs.clean, pairs.corrupt, metric, split, target=0.8, **groups
)
print(by_group)
print(by_group.edges["group"].value_counts().to_dict())
viz.plot_circuit(by_group, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_edges=40)

# %% [markdown]
# ## 7. Two garments in the Fashion model
#
# The same steps for T-shirts against shirts, a pair that Fashion-MNIST models often confuse.

# %%
fashion = HookedViT.from_bundled("fashion-vit")
garments = load_bundled_eval("fashion-vit")
shirt, tshirt = fashion.class_index("Shirt"), fashion.class_index("T-shirt/top")
garment_pairs = circuits.class_pairs(garments.images, garments.labels, tshirt, shirt, n=8)
garment_metric = garment_pairs.metric(fashion)
garment_scores = circuits.edge_attribution(
    fashion, garment_pairs.clean, garment_pairs.corrupt, garment_metric, method="eap-ig"
)
garment_circuit = circuits.discover_circuit(
    fashion,
    garment_pairs.clean,
    garment_pairs.corrupt,
    garment_metric,
    garment_scores,
    target=0.8,
)
print(garment_circuit)
garment_curve = circuits.faithfulness_curve(
    fashion,
    garment_pairs.clean,
    garment_pairs.corrupt,
    garment_metric,
    garment_scores,
    n_random=2,
)
viz.plot_faithfulness_curve(
    garment_curve,
    target=0.8,
    minimal=garment_circuit.n_edges,
    minimal_faithfulness=garment_circuit.faithfulness,
    title="T-shirt vs shirt: faithfulness by circuit size",
)

# %%
viz.circuit_view(
    garment_circuit,
    n_layers=fashion.cfg.n_layers,
    n_heads=fashion.cfg.n_heads,
    title="Fashion-MNIST: the T-shirt vs shirt circuit",
)

# %% [markdown]
# ## From the command line
#
# The `circuits` analysis of `vit-lens analyze` / `demo` does the same over a whole data set:
# it scores the edges on the first images of the class, then runs the circuits on every image of
# the class (resumable, per batch) and writes the edge scores, the circuit, the faithfulness curve
# and both figures into the report (the graph interactive, offline):
#
# ```bash
# vit-lens demo --analyses circuits --circuit-classes 3,8 --out runs/circuits-3-8
# vit-lens demo --bundled fashion-vit --analyses circuits --circuit-classes "T-shirt/top,Shirt" \
#     --circuit-corruption noise --out runs/circuits-tshirt
# ```
#
# `--circuit-classes A,rest` compares class A with its strongest other class;
# `--circuit-method eap` is faster, `--circuit-target` sets the share to recover.
