"""Gradients flow through HookedViT as through timm, and backward hooks see them."""

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit


def _input_grad(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x)[:, target].sum().backward()
    return x.grad


def test_input_gradients_match_timm():
    timm_model = create_timm_vit(
        "deit3_small_patch16_224", depth=2, embed_dim=96, num_heads=4, img_size=64
    )
    model = HookedViT.from_timm(timm_model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _input_grad(timm_model, x, 3)
    got = _input_grad(model, x, 3)
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def test_backward_hook_on_pattern_sees_the_gradient_of_the_attention_weights():
    model = HookedViT.from_timm(
        create_timm_vit("vit_base_patch16_224", depth=2, embed_dim=96, num_heads=4, img_size=64)
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep_pattern(pattern, hook):
        pattern.retain_grad()
        seen["pattern"] = pattern

    def keep_grad(grad, hook):
        seen["grad"] = grad.detach().clone()

    with model.hooks(
        fwd_hooks=[("blocks.1.attn.hook_pattern", keep_pattern)],
        bwd_hooks=[("blocks.1.attn.hook_pattern", keep_grad)],
    ):
        model(x)[:, 0].sum().backward()
    assert seen["grad"].shape == (2, 4, model.cfg.n_ctx, model.cfg.n_ctx)
    torch.testing.assert_close(seen["grad"], seen["pattern"].grad)
    assert seen["grad"].abs().max() > 0
