# %% [markdown]
# # 05 · Text-defined class spaces: the lens on an image–text model
#
# A CLIP or SigLIP image tower has no classifier: its classes are whatever the text tower says.
# Class names filled into prompt templates and encoded by the text tower give one direction per
# class, and the image tower with that **zero-shot head** is a classifier like any other (docs:
# *Concepts → Text-defined class spaces*). This notebook reads the bundled image–text model,
# `bundled:mnist-clip`, a genuine OpenCLIP `CLIP` trained here contrastively on MNIST digits and
# captions made from the class names:
#
# 1. the zero-shot head from text, with prompts seen and never seen in training;
# 2. the class-embedding lens in the text-defined space: where does the CLS token (and do the image
#    tokens) start to point at the right *text*? Against the same architecture at random init;
# 3. an attention knockout read through that lens;
# 4. the decomposition of the image representation into direct contributions of blocks, heads and
#    MLPs (Gandelsman et al., ICLR 2024), each read in the text-defined class space, and the
#    accuracy kept when all but the last blocks are mean-ablated.
#
# Offline, CPU only.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import pandas as pd
import torch

from vit_embedding_lens import HookedViT, lens, viz
from vit_embedding_lens.interventions import knockout
from vit_embedding_lens.zoo import load_mnist_eval
from vit_embedding_lens.zoo.clip import (
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    bundled_clip_tokenizer,
    clip_model_card,
    load_bundled_clip,
)

torch.manual_seed(0)
torch.set_grad_enabled(False)
pd.set_option("display.width", 120)
pd.set_option("display.precision", 3)

# %% [markdown]
# ## 0. The model and its card
#
# `HookedViT.from_pretrained("bundled:mnist-clip")` converts the OpenCLIP image tower exactly (its
# final norm, CLS pooling and projection to the 64-d joint space) and puts on it the zero-shot head
# made from the class names and the model's training templates by its own text tower. The card
# records the data, the command, the seed and the zero-shot accuracy on the 500 held-out digits.

# %%
card = clip_model_card()
print({k: card[k] for k in ("kind", "embed_dim", "data", "command")})
print("zero-shot accuracy (card):", card["zero_shot_accuracy"])

model = HookedViT.from_pretrained("bundled:mnist-clip")
print(model)
print("head:", model.cfg.head_type, "| classes:", model.class_names)

digits = load_mnist_eval()
subset = (torch.arange(len(digits)) % 50) < 20  # 20 digits per class (the set is sorted by class)
images, labels = digits.images[subset], digits.labels[subset]
on_digit = digits.class_token_mask(model.layout)[subset]  # True = image token on the stroke


def accuracy(m, x=images):
    return (m(x).argmax(-1) == labels[: len(x)]).float().mean().item()


print(f"{len(labels)} digits, zero-shot accuracy {accuracy(model):.3f}")

# %% [markdown]
# ## 1. Classes from text
#
# The class space is computed from prompts; change them and the head changes, the image tower does
# not. Templates never seen in training work about as well, numerals in place of words too. A
# computed space can be saved and reused without the text tower (`class_embeddings=`).

# %%
clip = load_bundled_clip()  # the OpenCLIP model itself, for its text tower
tokenizer = bundled_clip_tokenizer()
numerals = [str(i) for i in range(10)]
heads = {
    "training templates, words": model,
    "held-out templates, words": HookedViT.from_open_clip(
        clip, class_names=DIGIT_WORDS, templates=HELD_OUT_TEMPLATES, tokenizer=tokenizer
    ),
    "training templates, numerals": HookedViT.from_pretrained(
        "bundled:mnist-clip", class_names=numerals
    ),
    "a single prompt: '{}'": HookedViT.from_open_clip(
        clip, class_names=DIGIT_WORDS, templates=["{}"], tokenizer=tokenizer
    ),
}
pd.DataFrame({"zero-shot accuracy": {name: accuracy(m) for name, m in heads.items()}})

# %% [markdown]
# ## 2. The class-embedding lens in the text-defined space
#
# Every token of every block is read as the head reads the pooled token: the final norm, the
# projection, L2 normalization and the text embeddings (`ClassProjection`). The last block's CLS
# reading *is* the zero-shot logits. The random-init twin (same architecture, same text-defined
# head) shows what training put into the image tower.

# %%
twin = lens.random_init_twin(model, seed=0)
batches = [
    (images[i : i + 50], labels[i : i + 50], on_digit[i : i + 50]) for i in range(0, 200, 50)
]
result = lens.lens_dataset(model, batches, progress=False)
random_result = lens.lens_dataset(twin, batches, progress=False)

_, cache = model.run_with_cache(images[:8])
last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, model.layout.cls_index]
gap = (lens.ClassProjection(model)(last) - model(images[:8])).abs().max().item()
print(f"last block's CLS reading vs the zero-shot logits: max |diff| = {gap:.1e}")

groups = {"CLS": "cls", "image": "image"}
tests = lens.compare_with_random(result, random_result, groups=("cls", "image"))
viz.plot_identifiability_evolution(
    {n: lens.per_image_identifiability(result, "resid", g) for n, g in groups.items()},
    random={
        n: lens.per_image_identifiability(random_result, "resid", g) for n, g in groups.items()
    },
    pvalues={
        n: tests.query("token_group == @g").sort_values("block")["p_value"].to_numpy()
        for n, g in groups.items()
    },
    block_axis=1,
    title="bundled:mnist-clip in its text-defined class space: trained vs random init",
)
tests.pivot(index="block", columns="token_group", values=["trained", "random", "stars"])

# %% [markdown]
# The CLS token points at the right text more and more block by block, far above the random-init
# twin from the first block on; the image tokens stay much closer to chance: in this model, as in
# the supervised MNIST ViT, the class is gathered into the pooled token.
#
# ## 3. Attention knockout, read through the same lens
#
# `self_only`: image tokens attend only to themselves in every block; `no_cls`: no token attends to
# CLS. The lens runs inside the knockout, so the readings are of the knocked-out model.


# %%
def scores(**knock):
    if knock:
        with knockout(model, **knock):
            res, acc = lens.lens_batch(model, images, labels), accuracy(model)
    else:
        res, acc = lens.lens_batch(model, images, labels), accuracy(model)
    cls = lens.per_image_identifiability(res, "resid", "cls").mean(0)
    return acc, cls


rows = {}
for name, knock in {
    "none": {},
    "self_only": {"preset": "self_only"},
    "no_cls": {"preset": "no_cls"},
}.items():
    acc, cls = scores(**knock)
    rows[name] = {"accuracy": acc, **{f"CLS block {b}": float(v) for b, v in enumerate(cls)}}
pd.DataFrame(rows).T

# %% [markdown]
# Stopping image tokens from reading each other (`self_only`) costs much of the accuracy; stopping
# them from reading CLS (`no_cls`) costs almost nothing: the image tokens need their neighbours,
# not the CLS token.
#
# ## 4. Decomposing the image representation (Gandelsman et al., 2024)
#
# With the final norm's scale frozen at its actual value, the projected representation is an exact
# sum of direct contributions: the embeddings, every block's attention (per head) and MLP, and the
# biases. Each term is read in the text-defined class space (`direct_logits`): how much it alone
# pushes the correct digit's logit above the mean of the others. The terms sum to the
# representation, and their logits to the model's logits.

# %%
dec = lens.decompose_representation(model, images)
print(
    f"{dec.terms.shape[1]} terms; |sum - representation| max = "
    f"{(dec.total() - dec.representation).abs().max().item():.1e}"
)
direct = dec.direct_logits()  # [batch, term, class]
print(
    "|sum of term logits + bias - logits| max = "
    f"{(direct.sum(1) + dec.head_bias() - model(images)).abs().max().item():.1e}"
)
correct = direct.gather(2, labels[:, None, None].expand(-1, direct.shape[1], 1))[..., 0]
margin = correct - (direct.sum(2) - correct) / (model.cfg.n_classes - 1)
frame = dec.labels.assign(margin=margin.mean(0).numpy())
by_part = frame.groupby(["kind", "block"])["margin"].sum().unstack("kind").fillna(0.0)
by_part

# %% [markdown]
# Which blocks write the representation directly? Mean-ablating the direct contributions of all
# but the last `k` blocks (their means over the digits replace them) and keeping `k` blocks:

# %%
lens.mean_ablation(model, images, labels)

# %% [markdown]
# Most of the margin is written directly by the last blocks, above all the last block's attention
# and MLP: mean-ablating the direct contributions of every block but the last keeps most of the
# accuracy, while ablating all of them leaves chance. (Earlier blocks still matter *indirectly*,
# through what the later blocks read; this test removes only their direct writes.)
