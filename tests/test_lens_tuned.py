"""The tuned class lens: identity translators read exactly as the plain lens; trained translators
read the recorder's way and the direct way alike; training lowers held-out KL on both bundled
models, keeps the last block at the identity and is reproducible; save/load round-trips and refuses
other models; a model whose early basis is rotated (output unchanged) is read by the tuned lens
and not by the plain one; the causal check; the runner with ``lens="both"`` and its resume."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.cli import main
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.lens.ranks import class_rank
from vit_embedding_lens.lens.readings import logit_lens
from vit_embedding_lens.lens.streaming import (
    CHANGES,
    KINDS,
    LensResult,
    lens_batch,
    lens_dataset,
    lens_from_cache,
)
from vit_embedding_lens.lens.tuned import TunedClassLens
from vit_embedding_lens.lens.tuned_checks import (
    causal_check,
    identifiability_comparison,
    kl_table,
    lens_directions,
    readout_kl,
)
from vit_embedding_lens.runner import run_analyses, summarize_run
from vit_embedding_lens.runner.analyses.lens import LensAnalysis, prepare_tuned_lens
from vit_embedding_lens.runner.storage import batch_ids_on_disk, batch_path
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.zoo.bundled import load_bundled_eval

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLED = ("mnist-vit", "fashion-vit")
FIT = dict(epochs=8, n_tokens=8, progress=False)


@functools.lru_cache(maxsize=None)
def bundled(name: str) -> HookedViT:
    return HookedViT.from_bundled(name)


@functools.lru_cache(maxsize=None)
def split(name: str):
    """Even images to fit, odd ones to test (the MNIST eval set is sorted by class)."""
    data = load_bundled_eval(name, 320)
    return data.images[0::2], (data.images[1::2], data.labels[1::2])


@functools.lru_cache(maxsize=None)
def fitted(name: str, **options) -> TunedClassLens:
    fit_images, _ = split(name)
    batches = [fit_images[i : i + 40] for i in range(0, len(fit_images), 40)]
    return TunedClassLens.fit(bundled(name), batches, **{**FIT, **options})


@functools.lru_cache(maxsize=None)
def tiny() -> HookedViT:
    timm_model = create_timm_vit(
        "vit_tiny_patch16_224", depth=3, img_size=32, patch_size=8, num_classes=12, reg_tokens=2
    ).double()
    return HookedViT.from_timm(timm_model)


def random_lens(model: HookedViT, scale: float = 0.2, seed: int = 0) -> TunedClassLens:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    linear = scale * torch.randn(cfg.n_layers, cfg.d_model, cfg.d_model, generator=gen)
    bias = scale * torch.randn(cfg.n_layers, cfg.d_model, generator=gen)
    return TunedClassLens(model, linear, bias)


def assert_results_equal(a: LensResult, b: LensResult) -> None:
    for kind in KINDS:
        assert torch.equal(a.rank[kind], b.rank[kind]), kind
    for change in CHANGES:
        assert torch.equal(a.rose[change], b.rose[change]), change
    assert torch.equal(a.composition, b.composition)
    assert torch.equal(a.labels, b.labels)


# -- identity = plain ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_identity_translators_read_exactly_as_the_plain_lens(name):
    model = bundled(name)
    images, labels = split(name)[1]
    images, labels = images[:40], labels[:40]
    identity = TunedClassLens(model)
    assert identity.is_identity()
    assert_results_equal(
        lens_batch(model, images, labels), lens_batch(model, images, labels, lens=identity)
    )
    batches = [(images[:24], labels[:24]), (images[24:], labels[24:])]
    assert_results_equal(
        lens_dataset(model, batches, progress=False),
        lens_dataset(model, batches, progress=False, lens=identity),
    )
    _, cache = model.run_with_cache(images)
    assert_results_equal(
        lens_from_cache(model, cache, labels), lens_from_cache(model, cache, labels, lens=identity)
    )
    plain = logit_lens(model, images[:4], layer_types=("resid", "attn"))
    tuned = logit_lens(model, images[:4], layer_types=("resid", "attn"), lens=identity)
    assert plain.equals(tuned)


def test_tuned_recorder_matches_a_direct_reading():
    """Random translators: the recorder (parts summed through linearity, scales from translated
    sums) against reading every translated cached tensor on its own (float64: no near ties)."""
    model = tiny()
    lens = random_lens(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    labels = torch.tensor([0, 3, 7, 11])
    result = lens_batch(model, images, labels, lens=lens)
    _, cache = model.run_with_cache(images)
    proj = ClassProjection(model)
    target = labels[:, None].expand(-1, model.layout.n_tokens)

    def correct(logits):
        return logits.gather(-1, target[..., None])[..., 0]

    for layer in range(model.cfg.n_layers):

        def read(name, bias=True):
            return proj(lens.translate(layer, cache[f"blocks.{layer}.hook_{name}"], bias=bias))

        pre, post, mid = read("resid_pre"), read("resid_post"), read("resid_mid")
        attn, mlp = read("attn_out", False), read("mlp_out", False)
        assert torch.equal(result.rank["resid"][:, layer], class_rank(post, target))
        assert torch.equal(result.rank["attn"][:, layer], class_rank(attn, target))
        assert torch.equal(result.rank["mlp"][:, layer], class_rank(mlp, target))
        assert torch.equal(result.rose["block"][:, layer], correct(post) > correct(pre))
        assert torch.equal(result.rose["attn"][:, layer], correct(attn) > correct(pre))
        assert torch.equal(result.rose["mlp_vs_resid_mid"][:, layer], correct(mlp) > correct(mid))
    # cached readings need resid_pre of every block whose translator differs from the previous
    assert_results_equal(result, lens_from_cache(model, cache, labels, lens=lens))


def test_equal_consecutive_translators_reuse_the_previous_output():
    """A lens with one translator for all blocks reads each block input as the previous output
    (no resid_pre hook), and agrees with the same translator read block by block."""
    model = tiny()
    one = random_lens(model)
    shared = TunedClassLens(
        model,
        one.linear[:1].expand_as(one.linear).clone(),
        one.bias[:1].expand_as(one.bias).clone(),
    )
    from vit_embedding_lens.lens.streaming import LensRecorder

    names = [n for n, _ in LensRecorder(model, lens=shared).hooks()]
    assert [n for n in names if "resid_pre" in n] == ["blocks.0.hook_resid_pre"]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    labels = torch.tensor([1, 2, 3])
    result = lens_batch(model, images, labels, lens=shared)
    _, cache = model.run_with_cache(images)
    proj = ClassProjection(model)
    target = labels[:, None].expand(-1, model.layout.n_tokens)
    for layer in range(model.cfg.n_layers):
        post = proj(shared.translate(layer, cache[f"blocks.{layer}.hook_resid_post"]))
        assert torch.equal(result.rank["resid"][:, layer], class_rank(post, target))


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_training_lowers_heldout_kl_for_every_block(name):
    model, lens = bundled(name), fitted(name)
    card = lens.card
    plain, tuned = np.array(card["heldout_kl_plain"]), np.array(card["heldout_kl_tuned"])
    assert (tuned[:-1] < 0.8 * plain[:-1]).all(), (plain, tuned)
    # images never seen in fitting (the odd ones), at the model's readout
    images, _ = split(name)[1]
    kl = readout_kl(model, images, {"plain": "plain", "tuned": lens})
    plain_kl, tuned_kl = kl["plain"].mean(0), kl["tuned"].mean(0)
    assert (tuned_kl[:-1] < plain_kl[:-1]).all(), (plain_kl, tuned_kl)
    # the last block: the plain readout is the model's output, and the translator stays put
    assert plain_kl[-1].abs() < 1e-5 and tuned_kl[-1] < 1e-3
    norms = lens.linear.flatten(1).norm(dim=1)
    assert norms[-1] < 0.05 * norms[:-1].min(), norms
    table = kl_table(kl)
    assert set(table.columns) == {"block", "lens", "kl_mean", "kl_median", "n_images"}
    assert len(table) == 2 * model.cfg.n_layers


def test_training_is_reproducible_and_seeded():
    a, c = fitted("mnist-vit"), fitted("mnist-vit", seed=1)
    fit_images, _ = split("mnist-vit")
    again = TunedClassLens.fit(
        bundled("mnist-vit"), [fit_images[i : i + 40] for i in range(0, 160, 40)], **FIT
    )
    assert torch.equal(a.linear, again.linear) and torch.equal(a.bias, again.bias)
    assert not torch.equal(a.linear, c.linear)
    readout = fitted("mnist-vit", tokens="readout")
    assert readout.card["tokens"] == "readout" and readout.card["n_vectors"] == 160


# -- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip_and_refusals(tmp_path):
    model = bundled("mnist-vit")
    lens = fitted("mnist-vit")
    lens.save(tmp_path / "t")
    loaded = TunedClassLens.load(tmp_path / "t", model)
    assert torch.equal(loaded.linear, lens.linear) and torch.equal(loaded.bias, lens.bias)
    assert loaded.card == lens.card and loaded.card["epochs"] >= 1
    assert loaded.file_digest() == lens.file_digest()
    with pytest.raises(ValueError, match="model_name"):
        TunedClassLens.load(tmp_path / "t", bundled("fashion-vit"))
    with pytest.raises(ValueError, match="d_model"):
        TunedClassLens.load(tmp_path / "t", tiny())
    other_head = HookedViT.from_bundled("mnist-vit")
    with torch.no_grad():
        other_head.head.W_head.mul_(1.5)
    with pytest.raises(ValueError, match="class space"):
        TunedClassLens.load(tmp_path / "t", other_head)
    with pytest.raises(ValueError, match="class space"):
        lens_batch(other_head, split("mnist-vit")[1][0][:2], [0, 1], lens=lens)
    with pytest.raises(FileNotFoundError, match="not a saved tuned lens"):
        TunedClassLens.load(tmp_path / "nothing", model)


# -- a rotated early basis -------------------------------------------------------------------------
def rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``R`` with ``1 R = 1``: centring and the norm's scale commute with it."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(d, 1) / d**0.5
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.randn(d, d - 1, generator=gen)], 1))
    complement = basis[:, 1:]
    q, _ = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=gen))
    return ones @ ones.T + complement @ q @ complement.T


def test_a_rotated_early_basis_is_read_by_the_tuned_lens_only():
    """Block 1's stream is stored in a rotated basis (rotated back at block 2's input, so the
    model's output is unchanged): the plain lens reads block 1 wrongly, the tuned lens fitted on
    the rotated model reads it as a lens fitted on the unrotated model does."""
    model, block = bundled("mnist-vit"), 1
    r = rotation(model.cfg.d_model)
    assert torch.allclose(torch.ones(model.cfg.d_model) @ r, torch.ones(model.cfg.d_model))
    hooks = [
        (f"blocks.{block}.hook_resid_post", lambda x, hook: x @ r),
        (f"blocks.{block + 1}.hook_resid_pre", lambda x, hook: x @ r.T),
    ]
    fit_images, (images, _) = split("mnist-vit")
    batches = [fit_images[i : i + 40] for i in range(0, len(fit_images), 40)]
    options = dict(epochs=15, lr=1e-2, n_tokens=8, progress=False)  # a rotation is far to go
    clean_lens = TunedClassLens.fit(model, batches, **options)
    with torch.no_grad():
        clean = model(images)
        with model.hooks(fwd_hooks=hooks):
            assert torch.allclose(model(images), clean, atol=1e-4)
            rotated_lens = TunedClassLens.fit(model, batches, **options)
    predicted = clean.argmax(-1).numpy()

    def agreement(lens, rotated: bool) -> float:
        """Share of images whose CLS reading at ``block`` is the model's prediction."""

        def table():
            return logit_lens(model, images, k=1, blocks=[block], tokens=[0], lens=lens)

        if rotated:
            with model.hooks(fwd_hooks=hooks):
                rows = table()
        else:
            rows = table()
        return float((rows["class_id"].to_numpy() == predicted).mean())

    plain_clean, tuned_clean = agreement(None, False), agreement(clean_lens, False)
    plain_rotated, tuned_rotated = agreement(None, True), agreement(rotated_lens, True)
    assert plain_rotated < 0.5 * plain_clean, (plain_rotated, plain_clean)
    assert tuned_rotated > 0.9 * tuned_clean and tuned_rotated > plain_clean


# -- the causal check ------------------------------------------------------------------------------
def test_causal_check_columns_and_seeded_baseline():
    model = bundled("fashion-vit")
    lens = fitted("fashion-vit")
    images = split("fashion-vit")[1][0][:24]
    table = causal_check(model, images, lens, blocks=[0, -1], k=4, n_random=2, seed=3)
    assert list(table.columns) == [
        "block",
        "lens",
        "k",
        "kl_lens_directions",
        "kl_random_directions",
        "ratio",
        "causal",
        "n_images",
        "n_random",
    ]
    assert table["block"].tolist() == [0, 0, 5, 5] and table["lens"].tolist()[:2] == [
        "plain",
        "tuned",
    ]
    assert np.allclose(table["ratio"], table["kl_lens_directions"] / table["kl_random_directions"])
    again = causal_check(model, images, lens, blocks=[0, -1], k=4, n_random=2, seed=3)
    assert table.equals(again)
    other = causal_check(model, images, lens, blocks=[0, -1], k=4, n_random=2, seed=4)
    assert not np.allclose(other["kl_random_directions"], table["kl_random_directions"])
    # the last block's readout directions move the output far more than random ones
    assert table[table["block"] == 5]["causal"].all()
    u = lens_directions(model, lens, 2, 4)
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=u.dtype), atol=1e-10)
    with pytest.raises(ValueError, match="k must lie"):
        lens_directions(model, lens, 2, 50)


# -- runner and command line -----------------------------------------------------------------------
def test_runner_both_lenses_end_to_end_and_resume(tmp_path):
    model = bundled("mnist-vit")
    dataset = bundled_eval_dataset(model, n=30)
    out = tmp_path / "run"

    def run():
        lens, causal = prepare_tuned_lens(
            model, dataset, out, batch_size=10, causal_images=12, **FIT
        )
        analysis = LensAnalysis(random_twin=False, lens="both", tuned_lens=lens, causal=causal)
        results = run_analyses(model, dataset, [analysis], out, batch_size=8, progress=False)
        return lens, analysis, results

    lens, analysis, first = run()
    assert (out / "tuned_lens" / "translators.safetensors").is_file()
    arrays = {k: v.copy() for k, v in first["lens"].items()}
    assert {"tuned_rank_resid", "kl_plain", "kl_tuned", "rank_resid"} <= set(arrays)
    # the plain arrays are the plain lens's, the tuned ones the tuned lens's
    ref = lens_batch(model, dataset.images[:8], dataset.label_tensor[:8], lens=lens)
    assert np.array_equal(arrays["tuned_rank_resid"][:8], ref.rank["resid"].numpy())
    tables, figures = summarize_run(first, [analysis], model)
    for name in ("lens_identifiability", "lens_kl", "lens_causal", "tuned_lens_fit"):
        assert name in tables["lens"], name
    assert set(tables["lens"]["lens_identifiability"]["lens"]) == {"plain", "tuned"}
    assert "lens_comparison" in figures["lens"]
    batch_path(out, batch_ids_on_disk(out)[-1]).unlink()  # a killed run: resume
    lens2, _, second = run()
    assert torch.equal(lens2.linear, lens.linear)
    for key, value in arrays.items():
        assert np.array_equal(second["lens"][key], value), key
    # translators from elsewhere: the folder's causal check (of its own translators) is not reused
    other = random_lens(model, scale=0.05)
    other.card.update(lens.card)  # same model and class space
    other.save(tmp_path / "other")
    _, causal_other = prepare_tuned_lens(
        model, dataset, out, path=tmp_path / "other", causal_images=12, progress=False
    )
    stored = pd.read_csv(out / "tuned_lens" / "causal_check.csv")
    assert not np.allclose(causal_other["kl_lens_directions"], stored["kl_lens_directions"])


def test_plain_lens_analysis_config_is_unchanged():
    assert LensAnalysis().config() == {
        "random_twin": True,
        "twin_seed": 0,
        "kinds": list(KINDS),
    }
    assert "translators" in LensAnalysis(lens="both", tuned_lens="x").config()


def test_cli_demo_with_both_lenses(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--n", "20", "--analyses", "lens", "--out", str(out), "--no-progress"]
    assert main([*args, "--lens", "both", "--no-report"]) == 0
    assert (out / "tuned_lens" / "card.json").is_file()
    assert main([*args, "--tuned-lens", str(out / "tuned_lens")]) == 2
    assert "--tuned-lens needs --lens tuned" in capsys.readouterr().err
    # the tuned lens alone, from the saved translators, with the report
    other = tmp_path / "tuned_only"
    args = ["demo", "--n", "20", "--analyses", "lens", "--out", str(other), "--no-progress"]
    assert main([*args, "--lens", "tuned", "--tuned-lens", str(out / "tuned_lens")]) == 0
    tables = other / "report" / "tables"
    assert (tables / "lens__lens_kl.csv").is_file() and (tables / "lens__lens_causal.csv").is_file()
    assert not (tables / "lens__trained_vs_random.csv").exists()  # no twin for translators
    assert (other / "report" / "figures" / "lens__lens_comparison.png").is_file()


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_refused():
    model = bundled("mnist-vit")
    images = split("mnist-vit")[1][0][:2]
    with pytest.raises(ValueError, match="needs the translators"):
        lens_batch(model, images, [0, 1], lens="tuned")
    with pytest.raises(ValueError, match="lens must be"):
        lens_batch(model, images, [0, 1], lens=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lens must be one of"):
        LensAnalysis(lens="tunned")
    with pytest.raises(ValueError, match="tokens must be one of"):
        TunedClassLens.fit(model, [images], tokens="some")
    with pytest.raises(ValueError, match="val_fraction"):
        TunedClassLens.fit(model, [images], val_fraction=1.5)
    with pytest.raises(ValueError, match="each batch must be"):
        TunedClassLens.fit(model, ["not images"], progress=False)
    with pytest.raises(ValueError, match="must be linear"):
        TunedClassLens(model, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="needs a TunedClassLens"):
        causal_check(model, images, None)  # type: ignore[arg-type]
    frame = identifiability_comparison({"plain": lens_batch(model, images, [0, 1])})
    assert set(frame["lens"]) == {"plain"}


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_other_poolings_fit_and_read(pool):
    """CLS + registers and average pooling (fc_norm): the readout vector is the model's, so the
    plain readout of the last block is the model's output; identity reads as plain; a fit runs."""
    extra = dict(class_token=False, global_pool="avg") if pool == "avg" else dict(reg_tokens=2)
    timm_model = create_timm_vit(
        "vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, num_classes=7, **extra
    ).double()
    model = HookedViT.from_timm(timm_model)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4)).double()
    labels = torch.arange(12) % 7
    assert_results_equal(
        lens_batch(model, images, labels),
        lens_batch(model, images, labels, lens=TunedClassLens(model)),
    )
    lens = TunedClassLens.fit(model, [images[:6], images[6:]], epochs=2, n_tokens=4, progress=False)
    assert lens.card["epochs"] >= 1 and lens.card["n_vectors"] == 12 * 4
    kl = readout_kl(model, images, {"plain": "plain", "tuned": lens})
    assert kl["plain"][:, -1].abs().max() < 1e-10
    assert kl["tuned"].shape == (12, model.cfg.n_layers)
