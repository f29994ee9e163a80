# %% [markdown]
# # 03 · Interventions: knockout, token removal, activation patching, ablation
#
# The paper asks *where* the class information of a token comes from. This notebook intervenes on
# the bundled MNIST ViT with `vit_embedding_lens.interventions` and reads the effects in class
# space:
#
# 1. **attention knockout**: image tokens attend only to themselves (`self_only`), or not to CLS
#    (`no_cls`); how identifiable do the image tokens stay?
# 2. **context removal**: keep only the tokens on the digit's stroke, or only the background;
# 3. **activation patching** from a clean digit into a different one, token by token, drawn as
#    image-shaped heatmaps;
# 4. **ablation** of sublayers, heads and the "7" neurons found in notebook 02.
#
# Every intervention reads token positions from `model.layout`; nothing assumes one CLS token or a
# 7×7 grid. Offline, CPU only.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import pandas as pd
import torch

from vit_embedding_lens import HookedViT, lens, viz
from vit_embedding_lens.interventions import (
    ablate,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_block_every,
    get_act_patch_resid_pre,
    knockout,
    logit_diff,
    remove_context,
    remove_object,
)
from vit_embedding_lens.lens import ClassProjection
from vit_embedding_lens.zoo import load_mnist_eval

torch.manual_seed(0)
torch.set_grad_enabled(False)
pd.set_option("display.width", 120)
pd.set_option("display.precision", 3)

model = HookedViT.from_bundled()
layout = model.layout
digits = load_mnist_eval()
subset = (torch.arange(len(digits)) % 50) < 15  # 15 digits per class (the set is sorted by class)
images, labels = digits.images[subset], digits.labels[subset]
on_digit = digits.class_token_mask(layout)[subset]  # True = image token on the stroke
blocks = range(model.cfg.n_layers)


def accuracy(logits):
    return (logits.argmax(-1) == labels[: len(logits)]).float().mean().item()


print(f"{len(labels)} digits, accuracy {accuracy(model(images)):.3f}")

# %% [markdown]
# ## 1. Attention knockout
#
# `knockout(model, preset, blocks=..., mode=...)` removes attention edges in the chosen blocks.
# `pre_softmax` (default) masks the scores so the remaining weights renormalize; `post_softmax`
# zeroes the weights after the softmax without renormalizing, as the paper's reference code does.
# The lens runs inside the knockout: the readings are of the knocked-out model.

# %%
print(knockout(model, "self_only"))
print(knockout(model, "no_cls", mode="post_softmax"))


def image_token_scores(**knock):
    """Per image and block: mean identifiability of the image tokens, and the model's accuracy."""
    if knock:
        with knockout(model, **knock):
            result = lens.lens_batch(model, images, labels)
            logits = model(images)
    else:
        result, logits = lens.lens_batch(model, images, labels), model(images)
    return lens.per_image_identifiability(result, "resid", "image"), accuracy(logits)


settings = {
    "intact": {},
    "self_only": dict(preset="self_only"),
    "no_cls": dict(preset="no_cls"),
    "self_only (post-softmax)": dict(preset="self_only", mode="post_softmax"),
    "no_cls (post-softmax)": dict(preset="no_cls", mode="post_softmax"),
}
knocked = {name: image_token_scores(**kw) for name, kw in settings.items()}
pd.DataFrame(
    {
        name: {"accuracy": acc, **{f"block {b}": float(s[:, b].mean()) for b in blocks}}
        for name, (s, acc) in knocked.items()
    }
).T

# %%
viz.plot_identifiability_evolution(
    {name: knocked[name][0] for name in ["intact", "self_only", "no_cls"]},
    block_axis=1,
    kind="box",
    ylabel="image-token identifiability score",
    title="attention knockout in every block (pre-softmax)",
)

# %% [markdown]
# Without attention to other tokens (`self_only`), an image token only sees its own patch: its class
# identifiability stays near chance in every block, and the model loses most of its accuracy.
# Blocking only the CLS token (`no_cls`) changes much less: the image tokens gather their class
# information from each other.
#
# Knockout of chosen blocks only, e.g. the last three, and of single heads (`heads=`):

# %%
late = {
    f"self_only in blocks {lo}-{model.cfg.n_layers - 1}": dict(
        preset="self_only", blocks=range(lo, model.cfg.n_layers)
    )
    for lo in (1, 3, 5)
}
late.update(
    {
        f"self_only, head {h} only": dict(preset="self_only", heads=h)
        for h in range(model.cfg.n_heads)
    }
)
pd.DataFrame(
    {
        name: {"accuracy": acc, "image tokens, last block": float(s[:, -1].mean())}
        for name, (s, acc) in ((n, image_token_scores(**kw)) for n, kw in late.items())
    }
).T

# %% [markdown]
# ## 2. Context removal: object tokens vs context tokens
#
# Tokens are dropped from the sequence right after the position embedding (`model(images,
# keep_mask=...)`); the CLS token is always kept. `remove_context` keeps the tokens on the stroke
# ("class" tokens), `remove_object` keeps the background ("context" tokens). How well does the CLS
# token identify the digit, block by block, from each part alone?

# %%
resid_names = [f"blocks.{b}.hook_resid_post" for b in blocks]
projection = ClassProjection(model)


def cls_scores(run_cache):
    """Per image and block: the CLS token's identifiability score ``1 - rank / C``."""
    cls = torch.stack(
        [run_cache(name)[:, layout.cls_index] for name in resid_names], dim=1
    )  # [batch, block, d_model]
    logits = projection(cls)
    rank = lens.class_rank(logits, labels[:, None])
    return lens.identifiability_score(rank, model.cfg.n_classes)


_, full_cache = model.run_with_cache(images, names_filter=resid_names)
object_only = remove_context(model, images, on_digit, names_filter=resid_names)
context_only = remove_object(model, images, on_digit, names_filter=resid_names)
removal = {
    "all tokens": cls_scores(lambda name: full_cache[name]),
    "object tokens only": cls_scores(
        object_only.in_layout_order
    ),  # removed tokens come back as NaN
    "context tokens only": cls_scores(context_only.in_layout_order),
}
print(
    "tokens kept per digit:",
    {
        name: float(run.keep[:, layout.n_prefix :].sum(1).float().mean())
        for name, run in [("object", object_only), ("context", context_only)]
    },
)
print(
    "accuracy:",
    {
        "all": round(accuracy(model(images)), 3),
        "object only": round(accuracy(object_only.logits), 3),
        "context only": round(accuracy(context_only.logits), 3),
    },
)
viz.plot_identifiability_evolution(
    removal,
    block_axis=1,
    ylabel="CLS identifiability score",
    title="CLS token with only part of the image",
)

# %% [markdown]
# Either part alone is far from the full image: the model was trained on whole sequences, and a
# sequence of ~8 stroke tokens (or ~41 background tokens) is far from anything it saw. Both stay
# well above chance, though, and the background alone reads the digit about as well as the stroke:
# on MNIST the background is the negative of the shape, so it carries the class too.
#
# ## 3. Activation patching
#
# Pairs of digits: a clean "7" and a corrupted "1". Each sweep patches one activation of the clean
# run into the corrupted one (per block and token) and measures the logit difference `logit(7) -
# logit(1)` of the model's output, normalized so that 0 = the corrupted run, 1 = the clean run. The
# functions follow TransformerLens's names and take images; cells are batched (many patches per
# forward pass).

# %%
sevens, ones = torch.nonzero(labels == 7).flatten()[:8], torch.nonzero(labels == 1).flatten()[:8]
clean, corrupted = images[sevens], images[ones]
metric = logit_diff(
    model, target=7, other=1
)  # read at the logits; readout="cls"/"image" reads any block
_, clean_cache = model.run_with_cache(clean)
clean_value, corrupted_value = metric(model(clean)).item(), metric(model(corrupted)).item()
print(f"logit(7) - logit(1): clean {clean_value:.2f}, corrupted {corrupted_value:.2f}")


def normalized(result):
    return (result.values - corrupted_value) / (clean_value - corrupted_value)


resid = get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)
print(resid, "| grid:", tuple(resid.grid.shape), "| prefix:", tuple(resid.prefix.shape))
viz.plot_heatmap_grid(
    normalized(resid),
    layout=layout,
    colorbar_label="recovered logit difference",
    suptitle="patching resid_pre, one token at a time (CLS value in the titles)",
)

# %% [markdown]
# Early on, the class lives in the image tokens where the two digits differ (where a "7" has its bar
# and a "1" has nothing); from the middle blocks on it has moved into the CLS token, and patching
# the image tokens no longer helps. The same per sublayer (`get_act_patch_block_every`: the residual
# entering the block, the attention write-in and the MLP write-in):

# %%
every = get_act_patch_block_every(model, corrupted, clean_cache, metric, progress=False)
viz.plot_heatmap_grid(
    normalized(every),
    layout=layout,
    row_labels=every.coords["component"],
    col_labels=[f"block {b}" for b in every.coords["layer"]],
    colorbar_label="recovered",
)

# %% [markdown]
# Every result is also a tidy table (one row per cell), and head sweeps are `[block, head]`:

# %%
print(
    resid.frame.sort_values("value", ascending=False).head(6).to_string(index=False)
)  # raw logit differences
heads = get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric, progress=False)
pd.DataFrame(
    normalized(heads).numpy(),
    index=pd.Index(heads.coords["layer"], name="block"),
    columns=[f"head {h}" for h in heads.coords["head"]],
)

# %% [markdown]
# ## 4. Ablation
#
# `ablate(model, component, ...)` replaces an activation with zero, its mean over reference images
# (`method="mean"`), or a random reference image's (`"resample"`). Which sublayers does the model
# need? Mean ablation of each block's attention or MLP write-in, on the image tokens only or on
# every token:

# %%
reference = digits.images[~subset][::4]  # other digits for the means
rows = []
for block in blocks:
    for component in ("attn", "mlp"):
        for tokens in ("image", "all"):
            with ablate(
                model, component, blocks=block, tokens=tokens, method="mean", reference=reference
            ):
                rows.append(
                    dict(
                        block=block,
                        component=component,
                        tokens=tokens,
                        accuracy=accuracy(model(images)),
                    )
                )
pd.DataFrame(rows).pivot_table(index="block", columns=["component", "tokens"], values="accuracy")

# %% [markdown]
# Notebook 02 found the MLP neurons of the last block whose value vectors write the most "7"
# (`lens.top_memories`). Zero-ablating ten of them at the CLS token lowers the log-probability of
# "7"; ten random neurons of the same block, the control, barely move it:

# %%
last = model.cfg.n_layers - 1
seven_neurons = [
    int(n) for n in lens.top_memories(model, block=last, kind="mlp", class_id="7", k=10)["memory"]
]
log_p7 = model(images).log_softmax(-1)[:, 7]
is_seven = labels == 7


def drop_in_log_p7(neurons):
    with ablate(model, "neuron", blocks=last, neurons=neurons, tokens="cls"):
        change = model(images).log_softmax(-1)[:, 7] - log_p7
    return {
        "sevens": change[is_seven].mean().item(),
        "other digits": change[~is_seven].mean().item(),
    }


generator = torch.Generator().manual_seed(0)
controls = pd.DataFrame(
    [
        drop_in_log_p7(torch.randperm(model.cfg.d_mlp, generator=generator)[:10].tolist())
        for _ in range(10)
    ]
)
pd.DataFrame(
    {
        "the 10 '7' neurons": drop_in_log_p7(seven_neurons),
        "10 random neurons (mean of 10 draws)": controls.mean().to_dict(),
        "random, largest drop": controls.min().to_dict(),
    }
).T.rename(columns=lambda c: f"change in log p(7), {c}")
