# %% [markdown]
# # 01 · HookedViT: a timm Vision Transformer with TransformerLens hooks
#
# This notebook loads a ViT classifier as a `HookedViT`, looks at its token layout, caches and edits
# activations with hooks, uses TransformerLens's own cache methods on it (`accumulated_resid`,
# `decompose_resid`, `logit_attrs`), applies TransformerLens-style weight processing, checks the
# conversion against timm, and ends with attention and per-token class views.
#
# Everything runs **offline on a CPU** with the small trained model shipped with the package (a
# 6-block ViT on MNIST: a CLS token and 7×7 patch tokens, 10 classes). One clearly marked cell loads
# a pretrained ImageNet ViT when the Hugging Face hub is reachable and skips itself otherwise.

# %%
import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
os.environ.setdefault(
    "HF_HUB_OFFLINE", "1"
)  # offline by default; unset it to allow the optional hub cell

import pandas as pd
import torch

from vit_embedding_lens import HookedViT, viz
from vit_embedding_lens.loading import hub_reachable
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.zoo import load_mnist_eval, model_card

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only in this notebook
pd.set_option("display.width", 120)

# %% [markdown]
# ## 1. Load a model
#
# `HookedViT.from_bundled()` converts the bundled timm model; `HookedViT.from_timm(...)` does the
# same for any supported timm ViT: a live module, or a model name (with `pretrained=True`, or
# `checkpoint_path=` for your own weights).

# %%
model = HookedViT.from_bundled()
digits = load_mnist_eval()
images, labels = digits.images[::10], digits.labels[::10]  # 50 held-out digits, 5 per class
print(model)
print("model card: held-out accuracy", model_card()["held_out_accuracy"])
print("on these 50 digits:", (model(images).argmax(-1) == labels).float().mean().item())

# %% [markdown]
# ### Optional: a pretrained ImageNet ViT (needs the Hugging Face hub)
#
# `vit_base_patch32_224.augreg_in21k_ft_in1k` is one of the paper's models. This cell runs only when
# the hub is reachable and `HF_HUB_OFFLINE` is not set; otherwise it prints a note and the notebook
# continues with the bundled model.

# %%
PRETRAINED = "vit_base_patch32_224.augreg_in21k_ft_in1k"


imagenet_model = None
if hub_reachable():
    try:
        imagenet_model = HookedViT.from_timm(PRETRAINED, pretrained=True)
        print(imagenet_model)
    except Exception as error:  # a download or conversion problem must not stop the notebook
        print(f"NOTE: skipped {PRETRAINED}: {type(error).__name__}: {error}")
else:
    print(f"NOTE: the model hub is unreachable or HF_HUB_OFFLINE is set: skipped {PRETRAINED}.")
    print("      The rest of the notebook uses the bundled model.")

# %%
if imagenet_model is not None:  # classify matplotlib's sample photo with the paper's preprocessing
    import matplotlib.cbook
    from PIL import Image
    from torchvision.transforms import functional as TF

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = TF.normalize(TF.to_tensor(TF.resize(photo, [224, 224])), [0.5] * 3, [0.5] * 3)[None]
    top = imagenet_model(x).softmax(-1)[0].topk(5)
    names = imagenet_model.class_names or [str(i) for i in range(imagenet_model.cfg.n_classes)]
    print([(names[int(i)], round(float(p), 3)) for p, i in zip(top.values, top.indices)])

# %% [markdown]
# ## 2. The token layout
#
# Which sequence positions are CLS, distillation, register and image tokens, and the patch grid,
# live in `model.layout`. Every analysis reads it: never hard-code `[:, 1:]` or `14x14`.

# %%
layout = model.layout
print("prefix tokens:", layout.n_prefix, "| grid:", layout.grid_size, "| tokens:", layout.n_tokens)
print(layout.token_labels()[:10], "...")
print(
    "token of patch (2, 3):",
    layout.token_index(2, 3),
    "-> back:",
    layout.patch_position(layout.token_index(2, 3)),
)

# other layouts, on tiny random-weight timm models (no download)
for name, kwargs in [
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch16_224", dict(reg_tokens=4)),
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),
]:
    other = HookedViT.from_timm(create_timm_vit(name, depth=1, img_size=32, patch_size=8, **kwargs))
    print(f"{name} {kwargs}: {other.layout.token_labels()[:6]}")

# %% [markdown]
# ## 3. Cache activations
#
# `run_with_cache` returns the logits and a `ViTActivationCache`, a TransformerLens
# `ActivationCache`. Hook names follow TransformerLens.

# %%
logits, cache = model.run_with_cache(images)
shapes = pd.DataFrame(
    [
        (name, tuple(cache[name].shape))
        for name in cache.keys()
        if not name.startswith("blocks.") or name.startswith("blocks.0.")
    ],
    columns=["hook", "shape"],
)
shapes

# %%
# only what you need (a full ViT-B/16 cache is ~170 MiB per image), and TransformerLens short keys
_, resid_only = model.run_with_cache(
    images, names_filter=lambda name: name.endswith("hook_resid_post")
)
print(len(resid_only), "activations cached;", resid_only["resid_post", 3].shape)
print("image tokens of block 3:", cache.patch_tokens("blocks.3.hook_resid_post").shape)

# %% [markdown]
# ## 4. Hooks
#
# Hooks are TransformerLens hooks. First each block's whole attention write-in is zeroed
# (`hook_attn_out`), then the heads of one block one at a time (their `hook_z` slice), and the
# accuracy measured again: where does the model rely on attention?


# %%
def zero(activation, hook):
    return torch.zeros_like(activation)


def ablate_head(head):
    def hook(z, hook):  # z: [batch, pos, head, d_head]
        z[:, :, head] = 0.0
        return z

    return hook


def accuracy(out):
    return (out.argmax(-1) == labels).float().mean().item()


print(f"accuracy, intact: {accuracy(logits):.2f}")
pd.DataFrame(
    {
        "attention removed in block": range(model.cfg.n_layers),
        "accuracy": [
            accuracy(model.run_with_hooks(images, fwd_hooks=[(f"blocks.{b}.hook_attn_out", zero)]))
            for b in range(model.cfg.n_layers)
        ],
    }
)

# %%
pd.DataFrame(
    {
        "head removed in block 3": range(model.cfg.n_heads),
        "accuracy": [
            accuracy(
                model.run_with_hooks(images, fwd_hooks=[("blocks.3.attn.hook_z", ablate_head(h))])
            )
            for h in range(model.cfg.n_heads)
        ],
    }
)

# %%
# the same as a context manager; hooks are removed on exit
intact = model(images)
with model.hooks(fwd_hooks=[("blocks.3.hook_attn_out", zero)]):
    inside = model(images)
print(
    "changed inside:",
    not torch.allclose(inside, intact),
    "| restored after:",
    torch.equal(model(images), intact),
)

# %% [markdown]
# ## 5. TransformerLens's cache methods
#
# **The logit lens on the CLS token**: `accumulated_resid(apply_ln=True)` gives the residual stream
# after each block, normalized with the final norm's scale; through the head it is the CLS token's
# reading after every block. A ViT has no "last token": pass the position with `pos_slice`.

# %%
cls = layout.cls_index
resid, resid_labels = cache.accumulated_resid(apply_ln=True, pos_slice=cls, return_labels=True)
lens_logits = resid @ model.W_U + model.b_U  # [block + 1, batch, class]
pd.DataFrame(
    {
        "stage": resid_labels,
        "CLS top-1 accuracy": (lens_logits.argmax(-1) == labels).float().mean(-1).numpy(),
    }
)

# %% [markdown]
# **Direct logit attribution**: `decompose_resid` splits the CLS residual into the embeddings and
# every sublayer's write-in, `logit_attrs` projects each part onto the correct class's direction.
# With the final norm's weights folded into the head (`fold_ln=True`, as TransformerLens does it),
# the parts add up exactly to the correct-class logit minus the head bias.

# %%
folded = HookedViT.from_bundled(fold_ln=True)
folded_logits, folded_cache = folded.run_with_cache(images)
parts, part_labels = folded_cache.decompose_resid(pos_slice=cls, return_labels=True)
attrs = folded_cache.logit_attrs(parts, tokens=labels, pos_slice=cls)  # [n_parts, batch]
correct_logit = folded_logits.gather(-1, labels[:, None])[:, 0] - folded.b_U[labels]
print("max |sum of parts - logit|:", (attrs.sum(0) - correct_logit).abs().max().item())
pd.DataFrame(
    {"component": part_labels, "mean attribution to the correct class": attrs.mean(-1).numpy()}
)

# %%
heads, head_labels = folded_cache.stack_head_results(layer=-1, pos_slice=cls, return_labels=True)
head_attrs = folded_cache.logit_attrs(heads, tokens=labels, pos_slice=cls).mean(-1)
pd.DataFrame(
    head_attrs.reshape(model.cfg.n_layers, model.cfg.n_heads).numpy(),
    index=[f"block {l}" for l in range(model.cfg.n_layers)],
    columns=[f"head {h}" for h in range(model.cfg.n_heads)],
).round(3)

# %% [markdown]
# ## 6. Weight processing
#
# TransformerLens's weight processing, opt-in: `fold_ln`, `center_writing_weights`,
# `center_unembed`, `fold_value_biases`. Each step keeps the log-probabilities; `center_unembed`
# shifts every logit of an image by the same constant.

# %%
processed = HookedViT.from_bundled(
    fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
)
print("normalization:", model.cfg.normalization_type, "->", processed.cfg.normalization_type)
gap = (processed(images).log_softmax(-1) - logits.log_softmax(-1)).abs().max().item()
print(f"max |log-prob difference|: {gap:.2e}")
print(
    "W_out written into the residual is centred:",
    processed.blocks[0].mlp.W_out.mean(-1).abs().max().item(),
)

# %% [markdown]
# ## 7. Equivalence with timm
#
# The conversion is exact: the logits and every block's output equal timm's
# (`forward_intermediates`) up to float32 rounding. The bundled model's timm module, then a
# randomized distilled DeiT (two prefix tokens), both without any download.

# %%
from vit_embedding_lens.testing import assert_close_scaled, timm_reference
from vit_embedding_lens.zoo.bundled import load_bundled_timm

for name, timm_model, x in [
    ("bundled", load_bundled_timm(), images),
    (
        "deit distilled (random)",
        create_timm_vit("deit_tiny_distilled_patch16_224", depth=2, img_size=64),
        torch.randn(2, 3, 64, 64),
    ),
]:
    hooked = HookedViT.from_timm(timm_model)
    timm_logits, timm_blocks = timm_reference(timm_model, x)
    ours, ours_cache = hooked.run_with_cache(x)
    block_gap = max(
        (ours_cache[f"blocks.{l}.hook_resid_post"] - t).abs().max().item()
        for l, t in enumerate(timm_blocks)
    )
    assert_close_scaled(ours, timm_logits)
    print(
        f"{name}: max |logit diff| {(ours - timm_logits).abs().max().item():.1e}, max |block "
        f"output diff| {block_gap:.1e}"
    )

# %% [markdown]
# ## 8. Look at it: attention and per-token classes
#
# Interactive views (circuitsvis; token labels from `model.layout`) display below; where JavaScript
# is unavailable they show the static figure instead (`view.figure()`, `view.data` for the numbers).

# %%
view = viz.attention_view(model, cache, block=4, image_index=0)
view

# %%
viz.plot_attention(cache["blocks.4.attn.hook_pattern"][0], model, heads=[0, 1])

# %% [markdown]
# Every token read in class space after every block (the class-embedding projection,
# `E · ln_final(v) + b`): the top-1 digit of each image token, over the digit.

# %%
predictions = viz.token_class_predictions(model, cache, k=3, targets=labels)
viz.plot_token_grid(
    predictions.grid("top1", image_index=0), image=images[0], class_names=model.class_names
)

# %%
viz.class_probability_view(model, cache, image_index=0, image=images[0])

# %%
# the numbers behind it: identifiability of CLS and image tokens per block, over the 50 digits
ranks = predictions.target_ranks
pd.DataFrame(
    {
        "CLS top-1 (%)": 100 * (ranks[:, :, cls] == 0).float().mean(0).numpy(),
        "image tokens top-1 (%)": 100
        * (ranks[:, :, layout.n_prefix :] == 0).float().mean((0, 2)).numpy(),
    },
    index=pd.Index(predictions.blocks, name="block"),
).round(1)
