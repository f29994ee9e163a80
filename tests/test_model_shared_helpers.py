"""The one home of each small shared idea: hook names, block/head indices, class targets, the
hook-free readout, and the logit lens read two ways (a table and tensors) from one computation."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT, lens, viz
from vit_embedding_lens.attribution import readout as attribution_readout
from vit_embedding_lens.interventions import metrics as intervention_metrics
from vit_embedding_lens.lens.projection import ClassProjection, pooled_readout
from vit_embedding_lens.model.hook_names import (
    BLOCK_HOOKS,
    EMBED_HOOKS,
    READOUT_HOOKS,
    act_name,
    block_hook_names,
    hook_block,
)
from vit_embedding_lens.model.indices import (
    IndexOutOfRangeError,
    resolve_block,
    resolve_blocks,
    resolve_heads,
    resolve_indices,
)
from vit_embedding_lens.model.readout import readout_logits, readout_positions
from vit_embedding_lens.model.targets import (
    TargetTypeError,
    class_targets,
    predicted_classes,
)
from vit_embedding_lens.testing import create_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "tench, Tinca tinca", "goldfish", "shark"]


@functools.lru_cache(maxsize=None)
def tiny(distilled: bool = False) -> HookedViT:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    timm_model = create_timm_vit(
        name, depth=3, img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5
    )
    return HookedViT.from_timm(timm_model, class_names=NAMES)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- hook names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_hook_names_are_exactly_the_models_hook_points(distilled):
    model = tiny(distilled)
    optional = {"hook_image_embed"} | {n for n in READOUT_HOOKS if n.startswith("attn_pool.")}
    built = set(EMBED_HOOKS) | set(READOUT_HOOKS) - optional - (
        {"hook_pooled_dist"} if not distilled else set()
    )
    for block in range(model.cfg.n_layers):
        built |= {act_name(suffix, block) for suffix in BLOCK_HOOKS}
    assert built == set(model.hook_dict)


def test_act_name_reads_suffixes_and_transformer_lens_short_names():
    assert act_name("hook_resid_post", 2) == "blocks.2.hook_resid_post"
    assert act_name("attn.hook_z", 0) == "blocks.0.attn.hook_z"
    assert act_name("resid_post", 2) == "blocks.2.hook_resid_post"
    assert act_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert act_name("z", 3) == act_name("attn.hook_z", 3)
    assert act_name("pre", 3) == "blocks.3.mlp.hook_pre"
    assert act_name("scale", 1, "ln1") == "blocks.1.ln1.hook_scale"
    assert act_name("hook_logits") == "hook_logits"
    assert block_hook_names("mlp_out", [0, 2]) == ["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"]
    assert hook_block("blocks.11.attn.hook_z") == 11 and hook_block("hook_embed") is None


# -- indices --------------------------------------------------------------------------------------
def test_resolve_blocks_negatives_none_order_and_errors():
    model = tiny()
    assert resolve_blocks(model) == [0, 1, 2]
    assert resolve_blocks(3, [-1, 0, -1]) == [2, 0, 2]  # order and repeats kept by default
    assert resolve_blocks(model, [2, -3, 2], distinct=True) == [0, 2]
    assert resolve_blocks(model, 1) == [1] and resolve_block(model, -1) == 2
    assert resolve_blocks(model, [], allow_empty=True) == []
    with pytest.raises(ValueError, match="empty"):
        resolve_blocks(model, [])
    with pytest.raises(IndexOutOfRangeError, match=r"block 3 is out of range.*3 blocks \(0\.\.2"):
        resolve_blocks(model, [0, 3])
    # one error that both kinds of caller catch
    with pytest.raises(IndexError):
        resolve_block(model, -4)
    with pytest.raises(ValueError):
        resolve_block(model, -4)
    with pytest.raises(TypeError, match="int"):
        resolve_block(model, 1.0)
    with pytest.raises(TypeError, match="bool"):
        resolve_block(model, True)
    assert resolve_block(model, torch.tensor(2)) == 2


def test_resolve_heads_and_any_size():
    model = tiny()
    assert resolve_heads(model) == [0, 1]
    assert resolve_heads(model, [1, -2, 1]) == [0, 1]  # sorted, distinct
    with pytest.raises(IndexError, match="head 2 is out of range"):
        resolve_heads(model, [2])
    assert resolve_indices([5, -1], 8, "neuron", distinct=True) == [5, 7]


# -- class targets --------------------------------------------------------------------------------
def test_class_targets_from_ids_names_lists_and_tensors():
    model = tiny()
    assert class_targets(model, torch.tensor([4, 0]), 2).tolist() == [4, 0]
    assert class_targets(model, [1, 2, 3], 3).dtype == torch.int64
    assert class_targets(model, ["dog", "tinca tinca"], 2).tolist() == [1, 2]  # a synonym
    assert class_targets(model, "shark", 3, broadcast=True).tolist() == [4, 4, 4]
    assert class_targets(model, 3, 2, broadcast=True).tolist() == [3, 3]
    given = torch.tensor([1, 1])
    out = class_targets(model, given, 2)
    out[0] = 0
    assert given.tolist() == [1, 1]  # never an alias of the caller's tensor


def test_class_targets_errors_name_the_problem():
    model = tiny()
    with pytest.raises(ValueError, match="2 labels for 3 images: labels for a batch"):
        class_targets(model, [1, 2], 3, what="labels")
    with pytest.raises(ValueError, match="one per image, or one for all"):
        class_targets(model, [1, 2], 3, broadcast=True)
    with pytest.raises(ValueError, match="1 labels for 3 images"):
        class_targets(model, 1, 3, what="labels")  # one id stands for all only with broadcast
    with pytest.raises(ValueError, match=r"out of range: each must lie in \[0, 5\), got 0\.\.5"):
        class_targets(model, [0, 5], 2)
    with pytest.raises(ValueError, match="-1"):
        class_targets(model, [-1, 0], 2)
    with pytest.raises(TargetTypeError, match="integer class ids"):
        class_targets(model, torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="integer"):
        class_targets(model, torch.tensor([True, False]), 2)
    with pytest.raises(TypeError, match=r"\[batch\]"):
        class_targets(model, torch.zeros(2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="unknown class name"):
        class_targets(model, "zebra", 2, broadcast=True)


def test_predicted_classes_in_batches_and_attribution_default():
    model, x = tiny(), images(5)
    with torch.no_grad():
        expected = model(x).argmax(-1)
    assert torch.equal(predicted_classes(model, x, batch_size=2), expected)
    assert torch.equal(attribution_readout.resolve_classes(model, x), expected)
    assert attribution_readout.resolve_classes(model, x, "dog").tolist() == [1] * 5


# -- readout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_hook_free_readout_is_the_models_readout_and_fires_no_hook(distilled):
    model, x = tiny(distilled), images()
    logits, cache = model.run_with_cache(x)
    last = cache[act_name("resid_post", model.cfg.n_layers - 1)]
    fired = []
    with model.hooks(
        fwd_hooks=[
            (n, lambda a, hook: fired.append(hook.name))
            for n in READOUT_HOOKS
            if n in model.hook_dict
        ]
    ):
        with torch.no_grad():
            got = readout_logits(model, last)
    assert fired == []
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
    assert pooled_readout is readout_logits  # the lens name is the same function
    assert lens.pooled_readout is readout_logits
    if not distilled:
        torch.testing.assert_close(
            ClassProjection(model)(last[:, model.layout.cls_index]), got, atol=1e-5, rtol=1e-5
        )


def test_readout_positions_follow_the_pool():
    model = tiny()
    assert readout_positions(model) == [model.layout.cls_index]
    assert attribution_readout.readout_positions is readout_positions


# -- one definition each --------------------------------------------------------------------------
def test_each_shared_name_has_one_definition():
    assert intervention_metrics.class_rank is lens.class_rank
    assert viz.token_class_predictions == lens.readings.token_class_predictions
    assert viz.TokenClassPredictions is lens.readings.TokenClassPredictions
    assert attribution_readout.resolve_blocks is resolve_blocks


def test_class_rank_counts_strictly_larger_logits_with_ties_in_the_class_favour():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    rank = lens.class_rank(logits, torch.tensor([0, 3]))
    assert rank.tolist() == [0, 0] and rank.dtype == torch.int64
    assert lens.class_rank(logits, torch.tensor([1, 1])).tolist() == [3, 0]
    # a [batch] target broadcasts over the token axis
    per_token = torch.randn(2, 5, 4)
    expected = (per_token > per_token[..., 1:2]).sum(-1)
    assert torch.equal(lens.class_rank(per_token, torch.tensor([[1], [1]])), expected)


def test_logit_lens_table_and_tensors_come_from_one_reading():
    model, x = tiny(), images(3)
    labels = torch.tensor([0, 3, 4])
    table = lens.logit_lens(model, x, k=2, layer_types=("resid", "mlp"), blocks=[-1, 0])
    assert table.block.unique().tolist() == [2, 0]  # negative blocks count from the end
    for layer_type, hook in (("resid", "hook_resid_post"), ("mlp", "hook_mlp_out")):
        pred = viz.token_class_predictions(model, x, k=2, targets=labels, hook=hook, blocks=[2, 0])
        rows = table[table.layer_type == layer_type]
        ids = pred.topk_classes.permute(1, 0, 2, 3).reshape(-1)  # block, image, token, k
        assert rows.class_id.tolist() == ids.tolist()
        probs = pred.topk_probs.permute(1, 0, 2, 3).reshape(-1).double()
        torch.testing.assert_close(torch.tensor(rows.probability.to_numpy()), probs)
        # the target rank is the class_rank of the projected logits, by hand
        logits = ClassProjection(model)(model.run_with_cache(x)[1][act_name(hook, 0)]).detach()
        expected = (
            logits > logits.gather(-1, labels[:, None, None].expand(-1, model.layout.n_tokens, 1))
        ).sum(-1)
        assert torch.equal(pred.target_ranks[:, 1], expected)
