# %% [markdown]
# # 02 · The class-embedding lens: the paper's analyses
#
# Vilas, Schaumlöffel & Roig (NeurIPS 2023) read every token of every block of a ViT as class
# logits, `p(v) = E · ln_final(v) + b`, with the model's own final norm and classifier. This
# notebook runs the paper's analyses with `vit_embedding_lens.lens`:
#
# 1. how class identifiability evolves over the blocks, CLS vs image tokens, against the same
#    architecture at random init (one-sided Wilcoxon per block);
# 2. attention vs MLP: which sublayer raises the correct class, and how the residual is composed;
# 3. class ("on the digit") vs context tokens, with a permutation test;
# 4. the logit lens on one digit: top-k classes per token and block;
# 5. key-value memories: class-value agreement, key-value agreement, readable value vectors.
#
# The definitions are in the docs (*Concepts → Class-embedding projection*). Everything runs
# **offline on a CPU** with the bundled MNIST ViT (6 blocks, CLS + 7×7 image tokens, 10 classes);
# one marked cell loads a pretrained ImageNet ViT when the Hugging Face hub is reachable.

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # offline by default; unset it to allow the optional hub cell

import pandas as pd
import torch

from vit_embedding_lens import HookedViT, lens, viz
from vit_embedding_lens.loading import hub_reachable
from vit_embedding_lens.zoo import load_mnist_eval

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only in this notebook
pd.set_option("display.width", 120)
pd.set_option("display.precision", 3)

# %% [markdown]
# ## 0. The model, its random-init twin, and the digits
#
# `random_init_twin` rebuilds the same architecture with timm's default initialisation: the
# baseline that shows what *training* (not the architecture) puts into the class space. The digits
# come with stroke masks; `class_token_mask(layout)` labels each image token "class" (on the stroke)
# or "context", by nearest neighbour on the patch grid.

# %%
model = HookedViT.from_bundled()
twin = lens.random_init_twin(model, seed=0)
layout = model.layout

digits = load_mnist_eval()
subset = (torch.arange(len(digits)) % 50) < 20  # 20 digits per class (the set is sorted by class)
images, labels = digits.images[subset], digits.labels[subset]
on_digit = digits.class_token_mask(layout)[subset]  # [batch, pos], True = token on the stroke
print(
    f"{len(labels)} digits; {layout.n_prefix} prefix token(s), {layout.n_patches} image tokens on "
    f"a {layout.grid_size} grid"
)
print(f"tokens on the stroke per digit: {on_digit.sum(1).float().mean():.1f} of {layout.n_patches}")
print(
    f"accuracy: trained {(model(images).argmax(-1) == labels).float().mean():.3f}, "
    f"random init {(twin(images).argmax(-1) == labels).float().mean():.3f}"
)

# %% [markdown]
# ## 1. Read every block of every digit
#
# `lens_dataset` streams batches through the model; hooks reduce every token to the correct
# class's rank (`attn_out`, `mlp_out`, `resid_post`), whether its logit rose, and the residual's
# composition. Nothing else is kept, so this scales to ImageNet-sized runs. Batches are
# `(images, labels)` or `(images, labels, token_mask)`: with the mask, every table also splits the
# image tokens into "class" and "context".


# %%
def batches(size=50):
    return [
        (images[i : i + size], labels[i : i + size], on_digit[i : i + size])
        for i in range(0, len(labels), size)
    ]


result = lens.lens_dataset(model, batches(), progress=False)
random_result = lens.lens_dataset(twin, batches(), progress=False)
print(
    result.n_images,
    "images,",
    result.n_blocks,
    "blocks; rank tensors:",
    {k: tuple(v.shape) for k, v in result.rank.items()},
)
tables = lens.summarize(result, random_result)
print("tables:", list(tables))

# %% [markdown]
# ## 2. Evolution of class identifiability: CLS vs image tokens
#
# Per image and block, the mean identifiability score `s = 1 - rank / C` of its CLS token and of its
# image tokens (1.0 = the correct class is top-1, 0.5 = chance). Violins are the distributions
# over digits, dashed lines and bands the random-init twin, stars the one-sided paired Wilcoxon test
# trained > random (`compare_with_random`).

# %%
groups = {"CLS": "cls", "image": "image"}
trained_scores = {
    name: lens.per_image_identifiability(result, "resid", group) for name, group in groups.items()
}
random_scores = {
    name: lens.per_image_identifiability(random_result, "resid", group)
    for name, group in groups.items()
}
tests = lens.compare_with_random(result, random_result, groups=("cls", "image"))
pvalues = {
    name: tests.query("token_group == @group").sort_values("block")["p_value"].to_numpy()
    for name, group in groups.items()
}
viz.plot_identifiability_evolution(
    trained_scores,
    random=random_scores,
    pvalues=pvalues,
    block_axis=1,
    title="bundled MNIST ViT: trained vs random init",
)

# %%
tests.pivot(index="block", columns="token_group", values=["trained", "random", "p_value", "stars"])

# %% [markdown]
# How many image tokens are identifiable (the correct class is their top-1), and how many digits
# have at least one such token? Means of per-image percentages, as the paper reports them.

# %%
ident = tables["identifiability"]
ident_view = ident.query("layer_type == 'resid' and token_group in ['cls', 'image']").pivot_table(
    index="block", columns=["token_group", "metric"], values="value"
)
ident_view

# %%
last = result.n_blocks - 1
image_pct = ident.query("layer_type == 'resid' and token_group == 'image' and block == @last")
print(
    "last block, image tokens:",
    ", ".join(f"{m} = {v:.1f}" for m, v in zip(image_pct.metric, image_pct.value)),
)

# %% [markdown]
# ## 3. Attention vs MLP
#
# For each sublayer, the share of tokens whose correct-class logit *rises* from the block input to
# the sublayer's write-in (both read in class space; the write-in normalized on its own). `mlp`
# compares with the block input as the paper does; `mlp_vs_resid_mid` with the residual after
# attention. `block` is the block change rate: `resid_post` vs `resid_pre`.

# %%
changes = tables["change_rates"]
viz.plot_change_rates(
    changes.query("comparison in ['attn', 'mlp'] and token_group in ['cls', 'image']"),
    sublayer_col="comparison",
    group_col="token_group",
    value_col="value",
    percent=True,
    title="tokens whose correct-class logit rises (%)",
)

# %%
changes.query("token_group in ['cls', 'image']").pivot_table(
    index="block", columns=["token_group", "comparison"], values="value"
)

# %% [markdown]
# **Residual composition**: is the top-1 class after a block the top-1 of the attention write-in, of
# the MLP write-in, of the residual entering the block, or of none of them ("composed")? A token can
# match several sources, so the first three columns need not add up to 100.

# %%
tables["composition"].query("token_group == 'image'").pivot(
    index="block", columns="source", values="value"
)

# %% [markdown]
# ## 4. Class vs context tokens
#
# Image tokens on the digit's stroke vs the background: mean identifiability per block, their
# difference, and a one-sided permutation test (class > context) over the pooled tokens.

# %%
class_context = tables["class_vs_context"]
class_context

# %%
viz.plot_identifiability_evolution(
    {name: lens.per_image_identifiability(result, "resid", name) for name in ("class", "context")},
    pvalues={"class": class_context.sort_values("block")["p_value"].to_numpy()},
    block_axis=1,
    title="tokens on the stroke vs background",
)

# %% [markdown]
# ## 5. The logit lens on one digit
#
# `logit_lens` gives the top-k classes (with probabilities) of every token at every block: here the
# CLS token and three image tokens of one digit.

# %%
index = 3
digit, label = images[index : index + 1], int(labels[index])
probe_tokens = [
    layout.cls_index,
    layout.token_index(3, 3),
    layout.token_index(1, 3),
    layout.token_index(0, 0),
]
top = lens.logit_lens(model, digit, k=3, tokens=probe_tokens)
print(f"digit {index}: label {label}")
top.pivot_table(
    index=["token_label", "block"],
    columns="rank",
    values=["class_name", "probability"],
    aggfunc="first",
)

# %% [markdown]
# The top-1 class of every image token after every block, on the patch grid over the digit (the CLS
# token's top-1 in each panel's title). Early blocks read mostly one class everywhere; later blocks
# let the stroke tokens agree with the label.

# %%
top1 = lens.logit_lens(model, digit, k=1)
grid_values = torch.tensor(
    top1.pivot(index="block", columns="token", values="class_id").to_numpy()
)  # [block, pos]
viz.plot_token_grid(grid_values, image=digit[0], layout=layout, class_names=model.class_names)

# %%
correct = (grid_values[:, layout.n_prefix :] == label).float().mean(1)
print(
    "share of this digit's image tokens whose top-1 is the label, per block:",
    [round(float(c), 2) for c in correct],
)

# %% [markdown]
# ## 6. Key-value memories
#
# After Geva et al., each sublayer writes a weighted sum of fixed *value* vectors: one per MLP
# neuron (a row of `W_out`) and one per `(head, d_head)` entry of the attention output (a row of
# `W_O`). **Class-value agreement**: per class, the largest cosine between its class embedding and
# any value vector of a block, compared with the random-init twin (paired one-sided Wilcoxon over
# classes).

# %%
cva = lens.compare_class_value_agreement(model, twin)
cva.tests

# %%
viz.plot_identifiability_evolution(
    {kind: cva.trained[k] for k, kind in enumerate(["attn", "mlp"])},
    random={kind: cva.random[k] for k, kind in enumerate(["attn", "mlp"])},
    pvalues={
        kind: cva.tests.query("sublayer == @kind")["p_value"].to_numpy() for kind in ["attn", "mlp"]
    },
    chance=None,
    ylabel="max cosine(class embedding, value)",
    title="class-value agreement (distribution over classes)",
)

# %% [markdown]
# **Key-value agreement**: for class `c`, its top-5 memories are those whose values write the
# largest logit for `c` (`E · V^T`). A token of a digit of class `c` *agrees* when one of its 5 most
# activated memories (largest coefficients: MLP pre-activations, attention head outputs) is among
# them. The baseline draws a random class per image instead of the label. `composition_match`: the
# share of tokens whose sublayer output's top-1 class is the class of one of its top memories.

# %%
usage = lens.memory_usage(model, [(x, y) for x, y, _ in batches()], progress=False)
usage_frame = usage.to_frame()
image_rows = usage_frame.query("token_group == 'image'")
viz.plot_kv_agreement(
    image_rows.query("metric == 'kv_agreement'"),
    image_rows.query("metric == 'kv_agreement_random'"),
    value_col="value",
    title="key-value agreement, image tokens",
)

# %%
usage_frame.query("token_group in ['cls', 'image']").pivot_table(
    index="block", columns=["sublayer", "token_group", "metric"], values="value"
).round(3)

# %% [markdown]
# **Readable memories**: the classes a value vector promotes most. Here the MLP neurons of the last
# block that write the largest logit for the digit "7", and the classes each of them promotes.

# %%
sevens = lens.top_memories(model, block=-1, kind="mlp", class_id="7", k=3)
sevens

# %%
lens.value_topk(model, block=-1, kind="mlp", index=[int(i) for i in sevens["memory"]], k=3)

# %% [markdown]
# Any residual-space vector reads the same way, e.g. the mean CLS token after block 2 over the
# digits "7" (`vector=`):

# %%
_, cache = model.run_with_cache(images[labels == 7], names_filter="blocks.2.hook_resid_post")
lens.value_topk(model, vector=cache["blocks.2.hook_resid_post"][:, layout.cls_index].mean(0), k=3)

# %% [markdown]
# ## 6. A tuned class lens: reading early blocks in their own coordinates
#
# The plain lens reads every block through the final norm and head, as if its residual stream lived
# in the last block's basis. `TunedClassLens` learns one affine translator per block (identity at
# the start), so that reading block `l` through it matches the model's own output (KL, no labels;
# Belrose et al. 2023's tuned lens). It is fitted here on the 300 digits the analyses above do not
# use, then read beside the plain lens on the same 200 digits. The causal check projects out the
# directions each lens relies on and compares the change of the model's real output with random
# directions (*Concepts → Tuned class lens*).

# %%
from vit_embedding_lens.lens import tuned_checks

others = digits.images[~subset]
tuned = lens.TunedClassLens.fit(
    model, [others[i : i + 50] for i in range(0, len(others), 50)], epochs=10, progress=False
)
compared = {
    "plain": result,
    "tuned": lens.lens_batch(model, images, labels, token_mask=on_digit, lens=tuned),
}
side_by_side = tuned_checks.identifiability_comparison(compared)
kl = tuned_checks.kl_table(
    tuned_checks.readout_kl(model, images, {"plain": "plain", "tuned": tuned})
)
print(
    side_by_side.query("layer_type == 'resid' and metric == 'identifiable_pct'")
    .query("token_group in ['cls', 'image']")
    .pivot_table(index="block", columns=["token_group", "lens"], values="value")
    .round(1)
)
viz.plot_lens_comparison(side_by_side, kl, title="plain vs tuned class lens, MNIST ViT")

# %%
tuned_checks.causal_check(model, images[:40], tuned, n_random=2)[
    ["block", "lens", "kl_lens_directions", "kl_random_directions", "ratio", "causal"]
]

# %% [markdown]
# ## Optional: a pretrained ImageNet ViT (needs the Hugging Face hub)
#
# The same analyses on one of the paper's models, `vit_base_patch32_224.augreg_in21k_ft_in1k`, with
# the paper's preprocessing (resize to 224×224, no crop, mean = std = 0.5). This cell runs only when
# the hub is reachable and `HF_HUB_OFFLINE` is not set; otherwise it prints a note. (The photo is
# matplotlib's sample picture; for the paper's numbers use ImageNet-S and `vit-lens analyze`.)

# %%
PRETRAINED = "vit_base_patch32_224.augreg_in21k_ft_in1k"


if hub_reachable():
    try:
        import matplotlib.cbook
        from PIL import Image
        from torchvision.transforms import functional as TF

        imagenet = HookedViT.from_timm(PRETRAINED, pretrained=True)
        photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
        x = TF.normalize(TF.to_tensor(TF.resize(photo, [224, 224])), [0.5] * 3, [0.5] * 3)[None]
        predicted = imagenet(x).argmax(-1)
        photo_result = lens.lens_batch(imagenet, x, predicted)
        print(
            "predicted:",
            imagenet.class_names[int(predicted)] if imagenet.class_names else int(predicted),
        )
        print(
            lens.identifiability_table(photo_result)
            .query("layer_type == 'resid' and metric == 'identifiable_pct'")
            .pivot(index="block", columns="token_group", values="value")
        )
    except Exception as error:  # a download or conversion problem must not stop the notebook
        print(f"NOTE: skipped {PRETRAINED}: {type(error).__name__}: {error}")
else:
    print(f"NOTE: the model hub is unreachable or HF_HUB_OFFLINE is set: skipped {PRETRAINED}.")
