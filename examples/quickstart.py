"""Quick start: convert a timm ViT into a HookedViT, check it is exact, cache activations, and read
the CLS token through a logit lens block by block.

Runs offline on CPU in a few seconds: the ViT is built with ``pretrained=False`` and random weights,
so its class predictions are meaningless - the point is the API and the exactness check. The last
step loads the small trained model shipped with the package and reads its CLS token block by block.

    .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the model hub

import time

import torch

from vit_embedding_lens import HookedViT


def build_timm_vit() -> torch.nn.Module:
    """A 4-block ViT-S/16, no download; every parameter randomized when the testing helper
    exists."""
    from vit_embedding_lens.testing import create_timm_vit

    print(
        "   timm.create_model('vit_small_patch16_224', pretrained=False, depth=4), "
        "every weight randomized (vit_embedding_lens.testing.create_timm_vit)"
    )
    return create_timm_vit("vit_small_patch16_224", depth=4)


def bundled_model_logit_lens() -> None:
    """The trained model shipped with the package: accuracy, and the CLS token read per block."""
    from vit_embedding_lens.zoo import load_mnist_eval, model_card

    model = HookedViT.from_bundled()
    digits = load_mnist_eval()
    print(f"   {model}")
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            digits.images, names_filter=lambda n: n.endswith("hook_resid_post")
        )
    acc = (logits.argmax(-1) == digits.labels).float().mean().item()
    print(
        f"   held-out accuracy on {len(digits)} digits: {acc:.3f} (model card: "
        f"{model_card()['held_out_accuracy']})"
    )
    print("   CLS token read through the final norm and classifier after each block:")
    for layer in range(model.cfg.n_layers):
        cls = cache[f"blocks.{layer}.hook_resid_post"][:, model.layout.cls_index]
        readout = model.ln_final(cls) @ model.W_U + model.b_U
        block_acc = (readout.argmax(-1) == digits.labels).float().mean().item()
        print(f"     block {layer}: top-1 accuracy {block_acc:.3f}")


def main() -> None:
    t_start = time.perf_counter()
    torch.manual_seed(0)

    print("== 1. Build a timm ViT and convert it")
    timm_model = build_timm_vit().eval()
    model = HookedViT.from_timm(timm_model)
    cfg = model.cfg
    print(
        f"   {cfg.model_name}: {cfg.n_layers} blocks, d_model={cfg.d_model}, {cfg.n_heads} heads, "
        f"d_mlp={cfg.d_mlp}, {cfg.n_classes} classes, {cfg.n_ctx} tokens"
    )

    images = torch.randn(2, 3, *cfg.image_size)

    print("\n== 2. Exactness: HookedViT logits vs timm logits")
    with torch.inference_mode():
        ref = timm_model(images)
        out = model(images)
    diff = (out - ref).abs().max().item()
    print(f"   logits {tuple(out.shape)}, max |HookedViT - timm| = {diff:.3e}")
    assert diff < 1e-4, f"conversion is not exact: max abs diff {diff}"

    print("\n== 3. run_with_cache")
    with torch.inference_mode():
        logits, cache = model.run_with_cache(images)
    print(f"   {len(cache)} cached activations, for example:")
    for name in [
        "hook_embed",
        "hook_pos_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_pattern",
        "blocks.0.mlp.hook_post",
        f"blocks.{cfg.n_layers - 1}.hook_resid_post",
        "ln_final.hook_normalized",
        "hook_pooled",
        "hook_logits",
    ]:
        if name in cache:
            print(f"   {name:<34} {tuple(cache[name].shape)}")

    print("\n== 4. Token layout")
    layout = model.layout
    print(
        f"   n_tokens={layout.n_tokens}, n_prefix={layout.n_prefix}, cls_index={layout.cls_index}, "
        f"grid={layout.grid_size}"
    )
    print(f"   token_labels()[:5] = {layout.token_labels()[:5]}")

    print("\n== 5. Logit lens on the CLS token (TransformerLens accumulated_resid, apply_ln=True)")
    cls = layout.cls_index
    with torch.inference_mode():
        resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=cls, return_labels=True)
        lens_logits = resid @ model.W_U + model.b_U  # [n_layers + 1, batch, n_classes]
    probs = lens_logits.softmax(dim=-1)
    print(
        "   image 0: top class of the CLS token after each block "
        "('{l}_pre' = input to block l, 'final_post' = last block's output)"
    )
    for label, p in zip(labels, probs[:, 0]):
        top_p, top_c = p.max(dim=-1)
        print(f"   {label:>10}: class {top_c.item():4d}  p={top_p.item():.4f}")
    final_gap = (lens_logits[-1] - logits).abs().max().item()
    print(f"   lens at 'final_post' vs model logits: max abs diff {final_gap:.3e}")

    print("\n== 6. The bundled trained model (offline): HookedViT.from_bundled()")
    bundled_model_logit_lens()

    print(f"\nDone in {time.perf_counter() - t_start:.1f} s.")


if __name__ == "__main__":
    main()
