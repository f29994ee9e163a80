"""The tuned class lens: one learned affine translator per block, read through the plain readout.

The plain class-embedding lens reads block ``l``'s residual stream through the final norm and head,
as if it lived in the last block's basis. Early blocks need not: the tuned lens (Belrose et al.
2023, for language models) learns per block ``T_l(h) = h M_l + c_l`` with ``M_l = I + A_l``
(``A_l``, ``c_l`` start at zero: the identity), trained so that the class distribution read
through ``T_l`` and the plain readout (:class:`~vit_embedding_lens.lens.projection.ClassProjection`)
matches the model's own final one (KL divergence, no labels). Block ``l``'s write-ins
(``attn_out``, ``mlp_out``) are read through the linear part ``M_l`` only: they are summands of the
stream, and the bias belongs to the stream.

    lens = TunedClassLens.fit(model, loader)            # unlabeled images; seeded, early stopping
    lens.save("tuned/")                                  # translators.safetensors + card.json
    lens = TunedClassLens.load("tuned/", model)          # refuses another model or class space
    lens_dataset(model, loader, lens=lens)               # any lens reading takes ``lens=``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.readout import readout_vector

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

__all__ = ["TunedClassLens", "LensChoice", "resolve_lens", "class_space_fingerprint"]

TRANSLATORS_FILE = "translators.safetensors"
CARD_FILE = "card.json"
#: which token vectors train the translators
TOKEN_CHOICES = ("all", "readout")


def class_space_fingerprint(model: "HookedViT") -> str:
    """A hash of the folded readout (final norm folded into the head): two models share a class
    space for the lens exactly when they read vectors into the same logits."""
    proj = ClassProjection(model)
    digest = hashlib.sha256()
    for t in (proj.weight, proj.bias, *proj.tail.values()):
        digest.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TunedClassLens:
    """Per-block affine translators ``T_l(h) = h (I + A_l) + c_l`` for a model's residual streams.

    ``linear`` is ``A`` (``[block, d_model, d_model]``), ``bias`` is ``c`` (``[block, d_model]``),
    float32 on the CPU; both zero is the identity (the plain lens). ``card`` records the model, the
    class space, the data and the fit (see :meth:`fit`).
    """

    def __init__(
        self,
        model: "HookedViT",
        linear: Optional[Float[Tensor, "block d_model d_model"]] = None,
        bias: Optional[Float[Tensor, "block d_model"]] = None,
        card: Optional[Dict[str, Any]] = None,
    ) -> None:
        cfg = model.cfg
        n, d = cfg.n_layers, cfg.d_model
        self.linear = torch.zeros(n, d, d) if linear is None else linear.detach().float().cpu()
        self.bias = torch.zeros(n, d) if bias is None else bias.detach().float().cpu()
        if tuple(self.linear.shape) != (n, d, d) or tuple(self.bias.shape) != (n, d):
            raise ValueError(
                f"translators for {cfg.model_name} must be linear [{n}, {d}, {d}] and bias "
                f"[{n}, {d}], got {list(self.linear.shape)} and {list(self.bias.shape)}"
            )
        self.card: Dict[str, Any] = {
            "model_name": cfg.model_name,
            "d_model": d,
            "n_layers": n,
            "n_classes": cfg.n_classes,
            "class_space": class_space_fingerprint(model),
            **(card or {}),
        }

    # -- shape and identity ----------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return int(self.linear.shape[0])

    def matrix(self, block: int) -> Float[Tensor, "d_model d_model"]:
        """``M_l = I + A_l``."""
        return torch.eye(self.linear.shape[1]) + self.linear[block]

    def is_identity(self) -> bool:
        """True when every translator is exactly the identity (reads as the plain lens)."""
        return not bool(self.linear.any()) and not bool(self.bias.any())

    def translate(
        self, block: int, vectors: Float[Tensor, "... d_model"], *, bias: bool = True
    ) -> Float[Tensor, "... d_model"]:
        """``T_l(v) = v M_l + c_l`` (``bias=False``: ``v M_l``, for write-ins), in ``v``'s dtype
        and device. An exactly-zero ``A_l`` / ``c_l`` costs nothing (``v`` is returned as is)."""
        out = vectors
        if bool(self.linear[block].any()):
            out = out @ self.matrix(block).to(device=out.device, dtype=out.dtype)
        if bias and bool(self.bias[block].any()):
            out = out + self.bias[block].to(device=out.device, dtype=out.dtype)
        return out

    # -- checks ----------------------------------------------------------------------------------
    def check_model(self, model: "HookedViT") -> None:
        """Refuse a model these translators were not fitted for (ValueError naming what
        differs)."""
        cfg, card = model.cfg, self.card
        mine = {"model_name": cfg.model_name, "d_model": cfg.d_model, "n_layers": cfg.n_layers}
        mine["n_classes"] = cfg.n_classes
        differs = [
            f"{k} {card.get(k)!r} (translators) vs {v!r} (model)"
            for k, v in mine.items()
            if card.get(k) != v
        ]
        if differs:
            raise ValueError(
                "these tuned-lens translators were fitted for another model: " + "; ".join(differs)
            )
        space = class_space_fingerprint(model)
        if card.get("class_space") != space:
            raise ValueError(
                f"these tuned-lens translators were fitted for another class space (head and "
                f"final norm fingerprint {card.get('class_space')} vs the model's {space}): "
                f"refit them for this model's head"
            )

    # -- save / load -----------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``path/translators.safetensors`` and ``path/card.json``; returns ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"linear": self.linear.contiguous(), "bias": self.bias.contiguous()},
            str(path / TRANSLATORS_FILE),
        )
        (path / CARD_FILE).write_text(json.dumps(self.card, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model: "HookedViT") -> "TunedClassLens":
        """Translators saved by :meth:`save`, checked against ``model`` (shape, name and class
        space; a ValueError names what differs)."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (TRANSLATORS_FILE, CARD_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: not a saved tuned lens")
        card = json.loads((path / CARD_FILE).read_text())
        tensors = load_file(str(path / TRANSLATORS_FILE))
        lens = cls.__new__(cls)
        lens.linear, lens.bias, lens.card = tensors["linear"], tensors["bias"], card
        lens.check_model(model)
        return lens

    def file_digest(self) -> str:
        """A hash of the translators' values (for run fingerprints)."""
        digest = hashlib.sha256()
        for t in (self.linear, self.bias):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: "HookedViT",
        batches: Iterable[Any],
        *,
        tokens: str = "all",
        n_tokens: int = 32,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 256,
        val_fraction: float = 0.2,
        patience: int = 3,
        seed: int = 0,
        max_bytes: int = 512 * 2**20,
        progress: bool = True,
        data: str = "",
    ) -> "TunedClassLens":
        """Fit the translators on unlabeled images (labels are ignored).

        ``batches`` yields image tensors, ``(images, ...)`` tuples or objects with ``.images`` (a
        DataLoader or the runner's batches). Per image the collected vectors of every block's
        ``resid_post`` are the model's pooled readout vector (the mean over
        :func:`~vit_embedding_lens.model.readout.readout_positions`, the CLS token for CLS
        models) plus, with ``tokens="all"``, ``n_tokens - 1`` token positions drawn at random
        (seeded). The target of each vector is what the model's final block reads at the same
        place through the plain lens: for the readout vector, the model's final class
        distribution. Loss: ``sum_l KL(p_final || p_lens_l)``, all blocks at once (independent
        translators), Adam, several epochs over the cached vectors (at most ``max_bytes``),
        early stopping on a held-out share of the images (``val_fraction``, ``patience`` epochs).
        Deterministic given ``seed``.
        """
        if tokens not in TOKEN_CHOICES:
            raise ValueError(f"tokens must be one of {TOKEN_CHOICES}, got {tokens!r}")
        if n_tokens < 1 or epochs < 1 or batch_size < 1 or patience < 1:
            raise ValueError("n_tokens, epochs, batch_size and patience must be at least 1")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if not model.cfg.n_classes:
            raise ValueError(f"{model.cfg.model_name} has no classifier head: nothing to match")
        pooled = model.cfg.global_pool == "map"
        if pooled and tokens == "readout":
            raise ValueError(
                f"{model.cfg.model_name} pools with an attention pool: it has no single readout "
                "vector to fit on; use tokens='all' (token vectors, each matched to the last "
                "block's reading of the same token)"
            )
        gen = torch.Generator().manual_seed(seed)
        features, image_ids = _collect(
            model, batches, tokens, n_tokens, gen, max_bytes, progress=progress
        )
        n_images = int(image_ids.max()) + 1
        held = torch.rand(n_images, generator=gen) < val_fraction
        if held.all() or not held.any():
            held[:] = False
            held[-max(1, round(val_fraction * n_images)) :] = True
        if held.all():
            raise ValueError("need at least 2 images to fit and hold out")
        is_val = held[image_ids]
        # the readout vector comes first among each image's vectors (none for an attention pool)
        is_readout = torch.zeros(len(image_ids), dtype=torch.bool)
        if not pooled:
            is_readout[0] = True
            is_readout[1:] = image_ids[1:] != image_ids[:-1]
        # trained on the model's device, in float32
        device = next(model.parameters()).device
        train, val = features[~is_val].to(device), features[is_val].to(device)
        train_readout, val_readout = is_readout[~is_val].to(device), is_readout[is_val].to(device)
        proj = ClassProjection(model).to(dtype=torch.float32, device=device)
        cfg = model.cfg
        shape = (cfg.n_layers, cfg.d_model)
        linear = torch.zeros(*shape, cfg.d_model, device=device, requires_grad=True)
        bias = torch.zeros(*shape, device=device, requires_grad=True)
        # eps well above float round-off: at an optimum (the last block reads the model's output
        # exactly at the identity) Adam would otherwise turn round-off gradients into full steps
        optim = torch.optim.Adam([linear, bias], lr=lr, eps=1e-6)
        plain_kl = _heldout_kl(proj, val, val_readout, linear.detach(), bias.detach(), batch_size)
        best = (
            _objective(plain_kl).sum().item(),
            linear.detach().clone(),
            bias.detach().clone(),
            plain_kl,
        )
        bad, history = 0, []
        steps = 0
        bar = tqdm(range(epochs), disable=not progress, desc="tuned lens", unit="epoch")
        for epoch in bar:
            order = torch.randperm(len(train), generator=gen).to(device)
            for start in range(0, len(train), batch_size):
                pick = order[start : start + batch_size]
                optim.zero_grad(set_to_none=True)
                with torch.enable_grad():  # also when fit is called under no_grad
                    kl = _vector_kl(proj, train[pick], linear, bias)  # [vector, block]
                    loss = (kl * _weights(train_readout[pick])[:, None]).sum()
                    loss.backward()
                optim.step()
                steps += 1
            kl = _heldout_kl(proj, val, val_readout, linear.detach(), bias.detach(), batch_size)
            total = _objective(kl).sum().item()
            history.append(total)
            bar.set_postfix(heldout_kl=f"{total:.4f}")
            if total < best[0] * (1 - 1e-4):
                best, bad = (total, linear.detach().clone(), bias.detach().clone(), kl), 0
            else:
                bad += 1
                if bad >= patience:
                    break
        bar.close()
        card = {
            "data": data,
            "tokens": tokens,
            "n_tokens": n_tokens if tokens == "all" else 1,
            "n_images": n_images,
            "n_heldout_images": int(held.sum()),
            "n_vectors": int(len(features)),
            "epochs": len(history),
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "heldout_kl_history": history,
            "heldout_kl_plain": [float(v) for v in _objective(plain_kl)],
            "heldout_kl_tuned": [float(v) for v in _objective(best[3])],
            "heldout_kl_readout_plain": [float(v) for v in plain_kl[0]],
            "heldout_kl_readout_tuned": [float(v) for v in best[3][0]],
        }
        return cls(model, best[1].cpu(), best[2].cpu(), card)


LensChoice = Union[str, None, TunedClassLens]


def resolve_lens(model: "HookedViT", lens: LensChoice) -> Optional[TunedClassLens]:
    """``None``/``"plain"`` -> None (the plain lens); a :class:`TunedClassLens` is checked against
    ``model``; anything else is refused."""
    if lens is None or (isinstance(lens, str) and lens == "plain"):
        return None
    if isinstance(lens, TunedClassLens):
        lens.check_model(model)
        return lens
    if isinstance(lens, str) and lens == "tuned":
        raise ValueError(
            "lens='tuned' needs the translators: pass a TunedClassLens (TunedClassLens.fit or "
            ".load)"
        )
    raise ValueError(f"lens must be 'plain', None or a TunedClassLens, got {lens!r}")


# -- training internals ----------------------------------------------------------------------------
def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    images = getattr(batch, "images", None)
    if isinstance(images, Tensor):
        return images
    raise ValueError(
        "each batch must be an image tensor, an (images, ...) tuple or have .images, got "
        f"{type(batch).__name__}"
    )


def _collect(
    model: "HookedViT",
    batches: Iterable[Any],
    tokens: str,
    n_tokens: int,
    gen: torch.Generator,
    max_bytes: int,
    progress: bool,
) -> Tuple[Float[Tensor, "vector block d_model"], Tensor]:
    """Every block's ``resid_post`` at the sampled vectors of each image (float32, CPU), and the
    image index of each vector; one hooked forward per batch, no gradients."""
    cfg = model.cfg
    param = next(model.parameters())
    per_vector = cfg.n_layers * cfg.d_model * 4
    max_vectors = max(2, max_bytes // per_vector)
    parts: List[Tensor] = []
    ids: List[Tensor] = []
    n_vectors = n_images = 0
    for batch in tqdm(batches, disable=not progress, desc="tuned lens: collect", unit="batch"):
        images = _images_of(batch).to(device=param.device, dtype=param.dtype)
        if images.shape[0] == 0:
            continue
        layout = model.layout_for(images.shape[-2:]) if cfg.dynamic_img_size else model.layout
        b = images.shape[0]
        # an attention pool has no readout vector: its vectors are tokens only
        pooled = cfg.global_pool == "map"
        extra = 0 if tokens == "readout" else n_tokens - (0 if pooled else 1)
        picks = torch.stack(
            [torch.randperm(layout.n_tokens, generator=gen)[:extra] for _ in range(b)]
        ).to(param.device)  # [batch, extra]
        rows: Dict[int, Tensor] = {}

        def grab(resid: Tensor, hook: Any, layer: int = 0) -> None:
            taken = resid.gather(1, picks[..., None].expand(-1, -1, resid.shape[-1]))
            if not pooled:
                taken = torch.cat([readout_vector(model, resid, layout)[:, None], taken], 1)
            rows[layer] = taken.float().cpu()  # [batch, vectors per image, d]

        hooks = [
            (act_name("resid_post", layer), _bind(grab, layer)) for layer in range(cfg.n_layers)
        ]
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, f) for n, f in hooks]):
            model(images)
        stacked = torch.stack([rows[layer] for layer in range(cfg.n_layers)], 2)
        stacked = stacked.reshape(-1, cfg.n_layers, cfg.d_model)  # [vector, block, d]
        parts.append(stacked)
        per_image = rows[0].shape[1]  # fewer than n_tokens when the image has fewer tokens
        ids.append(torch.arange(n_images, n_images + b).repeat_interleave(per_image))
        n_vectors += len(stacked)
        n_images += b
        if n_vectors >= max_vectors:
            break
    if not parts:
        raise ValueError("no images to fit the tuned lens on: the batches were empty")
    return torch.cat(parts)[:max_vectors], torch.cat(ids)[:max_vectors]


def _bind(fn: Any, layer: int) -> Any:
    def hook(resid: Tensor, hook: Any) -> None:
        fn(resid, hook, layer)

    return hook


def _lens_logprobs(
    proj: ClassProjection,
    x: Float[Tensor, "vector block d_model"],
    linear: Tensor,
    bias: Tensor,
) -> Float[Tensor, "vector block class"]:
    """Log-probabilities of every block's vectors read through its translator and the readout."""
    t = x + torch.einsum("nld,lde->nle", x, linear) + bias
    return torch.log_softmax(proj(t), -1)


def _vector_kl(
    proj: ClassProjection, x: Tensor, linear: Tensor, bias: Tensor
) -> Float[Tensor, "vector block"]:
    """``KL(p_final || p_lens_l)`` per vector and block; ``p_final`` is what the last block reads
    at the same vector through the plain lens (the model's output for the readout vector)."""
    with torch.no_grad():
        target = torch.log_softmax(proj(x[:, -1]), -1)[:, None]  # [vector, 1, class]
    logp = _lens_logprobs(proj, x, linear, bias)
    return kl_divergence(target, logp)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` over the last axis, from log-probabilities (in their dtype)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _weights(is_readout: Tensor) -> Tensor:
    """Per-vector loss weights: the readout vectors and the sampled tokens count half each (the
    readout is one vector per image among ``n_tokens``), each group averaged."""
    n_read, n_tok = int(is_readout.sum()), int((~is_readout).sum())
    if n_tok == 0 or n_read == 0:
        return torch.full(is_readout.shape, 1.0 / len(is_readout), device=is_readout.device)
    return torch.where(is_readout, 0.5 / n_read, 0.5 / n_tok)


def _heldout_kl(
    proj: ClassProjection,
    x: Tensor,
    is_readout: Tensor,
    linear: Tensor,
    bias: Tensor,
    batch_size: int,
) -> Float[Tensor, "group block"]:
    """Held-out mean KL per block of the readout vectors (row 0) and of the sampled tokens (row 1;
    NaN without tokens)."""
    total = torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            kl = _vector_kl(proj, x[start : start + batch_size], linear, bias).double()
            read = is_readout[start : start + batch_size, None]
            total[0] += (kl * read).sum(0)
            total[1] += (kl * ~read).sum(0)
    n_read, n_tok = int(is_readout.sum()), int((~is_readout).sum())
    means = [
        total[0] / n_read if n_read else total[0] * NAN,
        total[1] / n_tok if n_tok else total[1] * NAN,
    ]
    return torch.stack(means).cpu()


def _objective(kl: Tensor) -> Tensor:
    """The training objective per block from :func:`_heldout_kl`'s rows (equal halves; one row
    alone when the other group is empty: NaN)."""
    if torch.isnan(kl[1]).all():
        return kl[0]
    if torch.isnan(kl[0]).all():
        return kl[1]
    return 0.5 * (kl[0] + kl[1])


NAN = float("nan")
