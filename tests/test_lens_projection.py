"""The class-space projection (METHODS §1) against references written differently: timm's own norm
and head modules, the HookedViT's ``ln_final``/``head`` modules, and ``F.layer_norm`` + matmul one
vector at a time; the readout equals the logits for every pooling style and after weight processing;
``unnormalized`` is linear; ``differentiable`` matches finite differences and autograd through the
modules; the logit-lens rows match a per-token argsort."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.projection import ClassProjection, pooled_readout, project
from vit_embedding_lens.lens.readings import logit_lens, project_head_writes, project_neuron_values
from vit_embedding_lens.testing import create_timm_vit, timm_reference

N_CLASSES = 20
CLASS_NAMES = [f"class_{c:02d}" for c in range(N_CLASSES)]
#: variant -> (timm name, overrides); depth 2, 32x32 images, patch 8 for all
VARIANTS = {
    "avg": (
        "vit_tiny_patch16_224",
        dict(class_token=False, global_pool="avg"),
    ),  # 0 prefix, fc_norm
    "avg_norm_first": (
        "vit_tiny_patch16_224",
        dict(class_token=False, global_pool="avg", fc_norm=False),
    ),
    "rpn": (
        "vit_base_patch16_rpn_224",
        dict(embed_dim=64, num_heads=4),
    ),  # post-norm blocks, avg pool
    "token": ("vit_tiny_patch16_224", dict(init_values=1e-5)),  # CLS + LayerScale
    "distilled": ("deit_tiny_distilled_patch16_224", dict()),  # CLS + distillation token, two heads
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),  # CLS + 4 registers
}
TOKEN_POOL = ("token", "registers")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def tiny(variant: str, **flags):
    """``(timm module, HookedViT)`` in float64; ``flags`` are from_timm's weight-processing
    flags."""
    name, kw = VARIANTS[variant]
    timm_model = create_timm_vit(
        name, depth=2, img_size=32, patch_size=8, num_classes=N_CLASSES, **kw
    ).double()
    model = HookedViT.from_timm(timm_model, class_names=CLASS_NAMES, **flags)
    assert next(model.parameters()).dtype == torch.float64
    return timm_model, model


def images(n: int = 3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- references ------------------------------------------------------------------------------------
def timm_projection(timm_model, v: torch.Tensor) -> torch.Tensor:
    """``E · norm(v) + b`` with timm's modules: fc_norm for pooled models, else the final norm; the
    average of both heads for distilled models (as timm averages their logits)."""
    norm = (
        timm_model.norm if isinstance(timm_model.fc_norm, torch.nn.Identity) else timm_model.fc_norm
    )
    normed = norm(v)
    logits = timm_model.head(normed)
    if getattr(timm_model, "head_dist", None) is not None:
        logits = (logits + timm_model.head_dist(normed)) / 2
    return logits


def module_projection(model, v: torch.Tensor) -> torch.Tensor:
    """The HookedViT's own ``ln_final`` and ``head`` modules (both heads read the same vector)."""
    normed = model.ln_final(v)
    return model.head(normed, normed) if model.cfg.has_dist_token else model.head(normed)


def loop_projection(model, vectors: torch.Tensor) -> torch.Tensor:
    """``F.layer_norm`` + matmul, one vector at a time (``vectors`` is ``[n, d_model]``)."""
    ln, head = model.ln_final, model.head
    w, b = (ln.w, ln.b) if ln.affine else (None, None)
    heads = [(head.W_head, head.b_head)]
    if model.cfg.has_dist_token:
        heads.append((head.W_head_dist, head.b_head_dist))
    rows = []
    for v in vectors:
        normed = F.layer_norm(v, (v.shape[0],), w, b, ln.eps)
        rows.append(sum(normed @ W + bias for W, bias in heads) / len(heads))
    return torch.stack(rows)


def close(actual, expected, tol: float = 1e-10):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# -- the projection operator -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_projection_matches_timm_modules_and_a_per_vector_loop(variant):
    timm_model, model = tiny(variant)
    v = torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        got = ClassProjection(model)(v)
        assert got.shape == (2, 5, N_CLASSES)
        close(got, timm_projection(timm_model, v))
        close(got, module_projection(model, v))
        close(got.reshape(-1, N_CLASSES), loop_projection(model, v.reshape(-1, model.cfg.d_model)))
        close(project(model, v), got)


@pytest.mark.parametrize("variant", TOKEN_POOL)
def test_last_block_cls_projection_is_the_logits(variant):
    _, model = tiny(variant)
    logits, cache = model.run_with_cache(images())
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    close(ClassProjection(model)(last[:, model.layout.cls_index]), logits, 1e-12)


def test_distilled_logits_are_the_mean_of_the_cls_and_dist_readings():
    _, model = tiny("distilled")
    logits, cache = model.run_with_cache(images())
    last, layout = cache["blocks.1.hook_resid_post"], model.layout
    cls_reading = ClassProjection(model, head="cls")(last[:, layout.cls_index])
    dist_reading = ClassProjection(model, head="dist")(last[:, layout.dist_index])
    close((cls_reading + dist_reading) / 2, logits, 1e-12)
    # each head alone is timm's head (resp. head_dist) on the normed token
    timm_model = tiny("distilled")[0]
    with torch.no_grad():
        close(cls_reading, timm_model.head(timm_model.norm(last[:, layout.cls_index])))
        close(dist_reading, timm_model.head_dist(timm_model.norm(last[:, layout.dist_index])))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pooled_readout_is_timms_head_at_every_block_and_the_logits_at_the_last(variant):
    timm_model, model = tiny(variant)
    x = images()
    logits, cache = model.run_with_cache(x)
    timm_logits, timm_blocks = timm_reference(timm_model, x)
    close(logits, timm_logits)  # the converted model itself, for the record
    with torch.no_grad():
        for block in range(model.cfg.n_layers):
            resid = cache[f"blocks.{block}.hook_resid_post"]
            # timm's forward_features ends with its norm; forward_head pools, applies fc_norm and
            # the head(s)
            close(
                pooled_readout(model, resid),
                timm_model.forward_head(timm_model.norm(timm_blocks[block])),
            )
        close(
            pooled_readout(model, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]),
            logits,
            1e-12,
        )


@pytest.mark.parametrize("variant", ["token", "avg", "distilled", "registers"])
def test_readout_equals_logits_after_fold_ln_and_center_unembed(variant):
    _, plain = tiny(variant)
    _, model = tiny(variant, fold_ln=True, center_unembed=True)
    assert not model.ln_final.affine
    logits, cache = model.run_with_cache(images())
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    close(pooled_readout(model, last), logits, 1e-12)
    if variant in TOKEN_POOL:
        close(ClassProjection(model)(last[:, model.layout.cls_index]), logits, 1e-12)
    # the residual stream is unchanged by these steps; each reading only shifts by a per-vector
    # constant
    v = torch.randn(7, model.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        shift = ClassProjection(model)(v) - ClassProjection(plain)(v)
        close(shift - shift.mean(-1, keepdim=True), torch.zeros_like(shift))
        close(ClassProjection(model)(v), loop_projection(model, v))
    _, folded_only = tiny(variant, fold_ln=True)
    with torch.no_grad():
        close(ClassProjection(folded_only)(v), ClassProjection(plain)(v))


@pytest.mark.parametrize("variant", ["token", "avg"])
def test_bfloat16_model_reads_close_to_the_float64_one(variant):
    timm_model, exact = tiny(variant)
    model = HookedViT.from_timm(timm_model, dtype=torch.bfloat16)
    x = images(dtype=torch.bfloat16)
    logits, cache = model.run_with_cache(x)
    last = cache["blocks.1.hook_resid_post"]
    readout = pooled_readout(model, last)
    assert readout.dtype == torch.bfloat16
    scale = logits.float().abs().max().item()
    torch.testing.assert_close(readout.float(), logits.float(), atol=0.03 * scale, rtol=0.03)
    if variant == "token":
        cls_reading = ClassProjection(model)(last[:, model.layout.cls_index])
        torch.testing.assert_close(
            cls_reading.float(), logits.float(), atol=0.03 * scale, rtol=0.03
        )
    # against the float64 model's reading of the same (bf16) vectors
    v = torch.randn(6, model.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        low = ClassProjection(model)(v.bfloat16()).double()
        high = ClassProjection(exact)(v)
    torch.testing.assert_close(low, high, atol=0.05 * high.abs().max().item(), rtol=0.05)


def test_unnormalized_is_linear_and_recombines_into_the_projection():
    _, model = tiny("registers")
    proj = ClassProjection(model)
    gen = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(4, 3, model.cfg.d_model, generator=gen, dtype=torch.float64) for _ in range(2)
    )
    q = proj.unnormalized
    close(q(a + b), q(a) + q(b))
    close(q(-2.5 * a), -2.5 * q(a))
    close(q(a + 7.0), q(a))  # a constant added to every component is centred away
    # scale: sqrt(biased variance + eps), one vector at a time
    flat = (a + b).reshape(-1, model.cfg.d_model)
    expected = torch.stack(
        [((v - v.mean()).pow(2).mean() + model.ln_final.eps).sqrt() for v in flat]
    )
    close(proj.scale(a + b).reshape(-1), expected)
    # the streaming identity: project a sum from the sum of its parts' q and the sum's own scale
    close(proj.from_parts(q(a) + q(b), proj.scale(a + b)), proj(a + b))
    close(proj(a), q(a) / proj.scale(a) + proj.bias)


@pytest.mark.parametrize("variant", ["token", "distilled"])
def test_differentiable_matches_finite_differences_and_autograd_through_the_modules(variant):
    _, model = tiny(variant)
    proj = ClassProjection(model)
    gen = torch.Generator().manual_seed(2)
    v0 = torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    weights = torch.randn(N_CLASSES, generator=gen, dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (proj.differentiable(v) * weights).sum()

    v = v0.clone().requires_grad_(True)
    value = proj.differentiable(v)
    close(value.detach(), proj(v0))
    (grad_v,) = torch.autograd.grad(loss(v), v)
    # central finite differences along every coordinate
    h = 1e-6
    with torch.no_grad():
        basis = torch.eye(v0.shape[0], dtype=torch.float64)
        finite = torch.stack([(loss(v0 + h * e) - loss(v0 - h * e)) / (2 * h) for e in basis])
    close(grad_v, finite, 1e-6)
    # gradients reach the live parameters exactly as through ln_final and head themselves
    params = [model.ln_final.w, model.ln_final.b, model.head.W_head, model.head.b_head]
    if model.cfg.has_dist_token:
        params += [model.head.W_head_dist, model.head.b_head_dist]
    ours = torch.autograd.grad(loss(v0), params)
    reference = torch.autograd.grad((module_projection(model, v0) * weights).sum(), params)
    for got, want in zip(ours, reference, strict=True):
        close(got, want)


def test_differentiable_reads_the_live_parameters():
    _, shared = tiny("token")
    model = copy.deepcopy(shared)
    proj = ClassProjection(model)
    v = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        model.head.b_head.add_(torch.arange(N_CLASSES, dtype=torch.float64))
        model.ln_final.w.mul_(2.0)
        close(proj.differentiable(v), module_projection(model, v))


def test_projection_errors_name_the_problem():
    timm_model = create_timm_vit(
        "vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=0
    )
    headless = HookedViT.from_timm(timm_model)
    with pytest.raises(ValueError, match="no classifier head"):
        ClassProjection(headless)
    _, model = tiny("token")
    with pytest.raises(ValueError, match="no distillation head"):
        ClassProjection(model, head="dist")
    with pytest.raises(ValueError, match="head must be"):
        ClassProjection(model, head="both")


# -- readings --------------------------------------------------------------------------------------
def test_logit_lens_rows_are_the_argsort_of_each_projection():
    _, model = tiny("registers")
    x, k, tokens = images(2), 3, [0, 2, 5, 9]
    layer_types = ("resid", "attn", "mlp")
    table = logit_lens(model, x, k=k, layer_types=layer_types, tokens=tokens)
    assert len(table) == 2 * model.cfg.n_layers * len(layer_types) * len(tokens) * k
    _, cache = model.run_with_cache(x)
    hooks = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
    labels = model.layout.token_labels()
    groups = table.groupby(["image", "block", "layer_type", "token"], sort=False)
    assert groups.ngroups == 2 * model.cfg.n_layers * len(layer_types) * len(tokens)
    for (image, block, layer_type, token), rows in groups:
        vector = cache[f"blocks.{block}.{hooks[layer_type]}"][image, token]
        with torch.no_grad():
            logits = loop_projection(model, vector[None])[0]
        order = torch.argsort(logits, descending=True)[:k].tolist()
        assert rows["rank"].tolist() == list(range(k))
        assert rows["class_id"].tolist() == order
        assert rows["class_name"].tolist() == [CLASS_NAMES[c] for c in order]
        assert set(rows["token_label"]) == {labels[token]}
        torch.testing.assert_close(
            torch.tensor(rows["logit"].to_numpy()), logits[order], atol=1e-9, rtol=1e-9
        )
        probs = torch.tensor(rows["probability"].to_numpy())
        torch.testing.assert_close(probs, logits.softmax(-1)[order], atol=1e-9, rtol=1e-9)
        assert probs.sum() <= 1 + 1e-12 and bool((probs[:-1] >= probs[1:]).all())


def test_logit_lens_rejects_bad_arguments():
    _, model = tiny("token")
    with pytest.raises(ValueError, match="unknown layer types"):
        logit_lens(model, images(1), layer_types=("residual",))
    with pytest.raises(ValueError, match="k must lie"):
        logit_lens(model, images(1), k=N_CLASSES + 1)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, images(1), blocks=[model.cfg.n_layers])


def test_head_writes_and_neuron_values_match_per_vector_loops():
    _, model = tiny("token")
    _, cache = model.run_with_cache(images(2))
    block = 1
    writes = project_head_writes(model, cache, block)
    z, w_o = cache[f"blocks.{block}.attn.hook_z"], model.blocks[block].attn.W_O
    assert writes.shape == (2, model.layout.n_tokens, model.cfg.n_heads, N_CLASSES)
    with torch.no_grad():
        for head in range(model.cfg.n_heads):
            write = z[:, :, head] @ w_o[head]  # [batch, pos, d_model]
            expected = loop_projection(model, write.reshape(-1, model.cfg.d_model))
            close(writes[:, :, head].reshape(-1, N_CLASSES), expected)
        values = project_neuron_values(model, block)
        close(values, loop_projection(model, model.blocks[block].mlp.W_out))
    _, post_norm = tiny("rpn")
    _, rpn_cache = post_norm.run_with_cache(images(1))
    with pytest.raises(ValueError, match="post-norm"):
        project_head_writes(post_norm, rpn_cache, 0)
