"""The ``vit-lens`` command: ``models``, ``analyze`` and ``demo``.

    vit-lens models                         # which timm ViTs convert, which are refused and why
    vit-lens analyze --model vit_base_patch16_224.augreg_in21k_ft_in1k --pretrained \\
        --data /data/ImageNet-S --layout imagenet-s --preprocess paper --out runs/b16
    torchrun --nproc-per-node 4 -m vit_embedding_lens analyze ...   # data-parallel
    vit-lens demo                           # offline, bundled model and digits

``analyze`` is resumable: rerunning the same command continues where a killed run stopped; a
different configuration in the same ``--out`` is refused (``--overwrite`` starts over). Exit codes:
0 success, 2 a problem the user can fix (printed without a traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

USER_ERROR = 2
DTYPE_NOTE = (
    "bfloat16/float16 logits agree with float32 to about 1e-2 relative (bf16 has 8 bits of "
    "mantissa); ranks of near-tied classes can differ, so compare such runs statistically"
)


# -------------------------------------------------------------------------------------------------
# Parser
# -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-lens",
        description=(
            "Class-embedding lens for timm Vision Transformers (Vilas et al., NeurIPS 2023)."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser(
        "models", help="timm ViT families the converter supports, and refusals with reasons"
    )
    models.add_argument(
        "--check", nargs="+", metavar="NAME", help="check these timm model names only"
    )
    models.add_argument(
        "--module",
        nargs="+",
        metavar="MODULE",
        help="timm modules to survey (default: all ViT modules)",
    )
    models.add_argument("--filter", metavar="PATTERN", help="timm name pattern, e.g. 'vit_base*'")
    models.add_argument("--list", action="store_true", help="print every model with its status")
    models.add_argument(
        "--no-cache", action="store_true", help="re-check instead of reading the cached survey"
    )
    models.add_argument("--no-progress", action="store_true")

    analyze = sub.add_parser(
        "analyze", help="run analyses over an image data set (resumable, torchrun-ready)"
    )
    src = analyze.add_argument_group("model")
    src.add_argument(
        "--model", help="timm model name (with tag), or bundled:mnist-vit / bundled:fashion-vit"
    )
    src.add_argument(
        "--checkpoint",
        help="weights file for --model, or a timm model folder (config.json + weights)",
    )
    src.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (needs the model hub)"
    )
    data = analyze.add_argument_group("data")
    data.add_argument(
        "--data", required=True, help="image folder (DIR/<class>/*.jpg) or ImageNet-S root"
    )
    data.add_argument("--layout", choices=("auto", "folder", "imagenet-s"), default="auto")
    data.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="first N images per class (sorted names); ImageNet-S default 5",
    )
    data.add_argument(
        "--split", default="validation", help="ImageNet-S split folder (default: validation)"
    )
    data.add_argument(
        "--keep-ambiguous",
        action="store_true",
        help="ImageNet-S: keep the 10 merged synsets the reference excludes",
    )
    data.add_argument(
        "--keep-short-classes",
        action="store_true",
        help="ImageNet-S: keep classes with fewer than --per-class images",
    )
    data.add_argument(
        "--categories",
        help="ImageNet-S categories file (ImageNetS_categories_im919.txt): segmentation ids",
    )
    data.add_argument(
        "--synset-mapping", help="LOC_synset_mapping.txt: synset -> class index by line order"
    )
    data.add_argument(
        "--token-labels",
        choices=("nearest", "corner", "area"),
        default=None,
        help="mask -> tokens (default: the preset's): nearest (patch centre; library), corner "
        "(top-left pixel, the reference code's rule; paper), area (--threshold)",
    )
    data.add_argument(
        "--threshold", type=float, default=0.5, help="area fraction for --token-labels area"
    )
    data.add_argument(
        "--preprocess",
        choices=("timm", "paper"),
        default="timm",
        help=(
            "timm: the model's data config; paper: resize to the input size, bilinear, mean=std=0.5"
        ),
    )
    data.add_argument(
        "--on-error",
        choices=("skip", "raise"),
        default="skip",
        help="unreadable images: skip (count, warn) or stop",
    )
    _add_run_options(analyze)

    demo = sub.add_parser(
        "demo", help="offline demo: a bundled ViT and its eval images, with foreground masks"
    )
    demo.add_argument(
        "--bundled",
        default="mnist-vit",
        help="which bundled model: mnist-vit (digits, the default) or fashion-vit (Fashion-MNIST)",
    )
    demo.add_argument("--n", type=int, default=None, help="first N eval images (default: all 500)")
    _add_run_options(demo, default_out="vit-lens-demo")
    return parser


def _add_run_options(p: argparse.ArgumentParser, default_out: Optional[str] = None) -> None:
    run = p.add_argument_group("run")
    run.add_argument(
        "--preset",
        choices=("library", "paper"),
        default="library",
        help="library: the library's definitions (default); paper: every choice where the "
        "reference code differs by design set to the reference's (knockout post-softmax, corner "
        "token labels, double-softmax attribution loss, CLS-inclusive percentages), to reproduce "
        "published numbers",
    )
    run.add_argument(
        "--analyses",
        default=None,
        help=(
            "comma-separated analyses (default: accuracy, lens, knockout, context_removal, "
            "memories, attribution; `vit-lens models --list` style names, see docs)"
        ),
    )
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    run.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help=DTYPE_NOTE
    )
    run.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data loading processes (default: 4 on GPU, 0 on CPU)",
    )
    run.add_argument(
        "--out", required=default_out is None, default=default_out, help="output folder"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a previous run in --out instead of resuming",
    )
    run.add_argument("--no-report", action="store_true", help="skip tables, figures and index.html")
    run.add_argument("--no-progress", action="store_true")
    _add_lens_options(run)


# -------------------------------------------------------------------------------------------------
# Commands
# -------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from vit_embedding_lens.runner.model_support import (
        VIT_MODULES,
        check_model_support,
        refusal_reasons,
        support_by_module,
        survey_models,
        vit_model_names,
    )

    if args.check:
        for name in args.check:
            entry = check_model_support(name)
            status = "supported" if entry.supported else f"refused: {entry.reason}"
            print(f"{name} ({entry.module}): {status}")
        return 0
    names = vit_model_names(args.module or VIT_MODULES, args.filter)
    if not names:
        print("no timm models match", file=sys.stderr)
        return USER_ERROR
    survey = survey_models(names, progress=not args.no_progress, cache=not args.no_cache)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 90, "display.width", 200):
        print(
            f"timm {_timm_version()}: {int(survey['supported'].sum())} of {len(survey)} ViT models "
            "convert exactly\n"
        )
        print(support_by_module(survey).to_string(index=False))
        reasons = refusal_reasons(survey)
        if len(reasons):
            print("\nrefused, by reason (from the converter's own checks):")
            print(reasons.to_string(index=False))
        if args.list:
            print()
            print(survey.to_string(index=False))
    return 0


def _timm_version() -> str:
    import timm

    return timm.__version__


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return name


def _detect_layout(data: Path, split: str) -> str:
    markers = (data / f"{split}-segmentation", data / "ImageNetS919")
    return "imagenet-s" if any(m.is_dir() for m in markers) else "folder"


def cmd_analyze(args: argparse.Namespace) -> int:
    from vit_embedding_lens.data.transforms import resolve_preprocessing
    from vit_embedding_lens.loading import parse_model_name
    from vit_embedding_lens.runner import distributed
    from vit_embedding_lens.runner.models import load_model

    parse_model_name(args.model, args.checkpoint)  # a bad model name fails before any work
    device = _resolve_device(args.device)
    ctx = distributed.init_distributed(device)
    try:
        device = str(distributed.device_for(ctx, device))
        loaded = load_model(
            args.model, args.checkpoint, args.pretrained, device=device, dtype=args.dtype
        )
        model = loaded.model
        preprocessing = resolve_preprocessing(model, args.preprocess, loaded.data_config)
        data = Path(args.data)
        if not data.exists():
            raise FileNotFoundError(f"--data {data} does not exist")
        layout = _detect_layout(data, args.split) if args.layout == "auto" else args.layout
        dataset = _build_dataset(args, layout, data, model, preprocessing)
        if ctx.is_main:
            what = f"{len(dataset)} images ({layout} layout, {args.preprocess} preprocessing)"
            print(f"{model!r}\n{what} on {device}, {args.dtype}")
        run_config = {"model_spec": loaded.spec, "data_dir": str(data.resolve()), "layout": layout}
        return _run_and_report(
            args,
            model,
            dataset,
            run_config,
            title=f"{loaded.spec['model_name']} on {data.name}",
            ctx=ctx,
        )
    finally:
        distributed.shutdown()


def _build_dataset(
    args: argparse.Namespace, layout: str, data: Path, model: HookedViT, preprocessing: Any
) -> Any:
    if layout == "imagenet-s":
        from vit_embedding_lens.data.imagenet_s import imagenet_s_dataset

        return imagenet_s_dataset(
            data,
            model,
            preprocessing,
            split=args.split,
            per_class=args.per_class if args.per_class is not None else 5,
            exclude_ambiguous=not args.keep_ambiguous,
            drop_short_classes=not args.keep_short_classes,
            categories=args.categories,
            synset_mapping=args.synset_mapping,
            token_labels=args.token_labels or _preset(args).token_labels,
            threshold=args.threshold,
            on_error=args.on_error,
        )
    from vit_embedding_lens.data.images import image_folder_dataset

    return image_folder_dataset(
        data,
        model,
        preprocessing,
        per_class=args.per_class,
        synset_mapping=args.synset_mapping,
        on_error=args.on_error,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from vit_embedding_lens.data.images import bundled_eval_dataset
    from vit_embedding_lens.loading import ModelSource
    from vit_embedding_lens.runner.models import load_model
    from vit_embedding_lens.zoo.bundled import bundled_spec

    device = _resolve_device(args.device)
    spec = bundled_spec(args.bundled)
    loaded = load_model(ModelSource("bundled", spec.name).label, device=device, dtype=args.dtype)
    dataset = bundled_eval_dataset(
        loaded.model, n=args.n, name=spec.name, token_labels=_preset(args).token_labels
    )
    print(
        f"{loaded.model!r}\n{len(dataset)} bundled eval images ({spec.foreground} masks as "
        f"segmentation) on {device}, {args.dtype}"
    )
    run_config = {"model_spec": loaded.spec}
    return _run_and_report(
        args, loaded.model, dataset, run_config, title=f"vit-lens demo: bundled {spec.name}"
    )


def _run_and_report(
    args: argparse.Namespace,
    model: HookedViT,
    dataset: Any,
    run_config: dict,
    title: str,
    ctx: Any = None,
) -> int:
    from vit_embedding_lens.presets import preset_analyses
    from vit_embedding_lens.report import format_headlines, headline_tables, write_report
    from vit_embedding_lens.runner import run_analyses, summarize_run

    preset = _preset(args)
    analyses = preset_analyses(args.analyses.split(",") if args.analyses else None, preset)
    analyses = _apply_lens_choice(args, analyses, model, dataset)
    run_config = {**run_config, "preset": preset.as_dict()}
    device_type = next(model.parameters()).device.type
    workers = (
        args.num_workers if args.num_workers is not None else (4 if device_type == "cuda" else 0)
    )
    out = Path(args.out)
    start = time.perf_counter()
    results = run_analyses(
        model,
        dataset,
        analyses,
        out,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        num_workers=workers,
        run_config=run_config,
    )
    if results is None:  # not rank 0: rank 0 merges and reports
        return 0
    seconds = time.perf_counter() - start
    n_skipped = len(results.skipped)
    print(f"\n{len(results)} images analysed, {n_skipped} skipped, in {seconds:.1f} s -> {out}")
    if n_skipped:
        print(f"skipped images and reasons: {out / 'manifest.json'} ('skipped')", file=sys.stderr)
    if args.no_report:
        return 0
    tables, figures = summarize_run(results, analyses, model)
    print()
    print(format_headlines(headline_tables(tables, analyses)))
    meta = {
        "title": title,
        "model": model.cfg.model_name,
        "images": len(results),
        "skipped": n_skipped,
        "analyses": ", ".join(a.name for a in analyses),
        "preset": _preset_summary(preset),
        "dtype": args.dtype,
        "batch size": args.batch_size,
        "output": str(out.resolve()),
    }
    page = write_report(out / "report", tables, figures, meta, results.manifest)
    print(f"\nreport: {page}")
    return 0


def _preset(args: argparse.Namespace) -> Any:
    from vit_embedding_lens.presets import get_preset

    return get_preset(getattr(args, "preset", None))


def _preset_summary(preset: Any) -> str:
    """The preset's name and choices, for the report's header."""
    choices = ", ".join(f"{k}={v}" for k, v in preset.as_dict().items() if k != "name")
    return f"{preset.name} ({choices})"


# -------------------------------------------------------------------------------------------------
# The tuned class lens (--lens / --tuned-lens)
# -------------------------------------------------------------------------------------------------
def _add_lens_options(run: Any) -> None:
    run.add_argument(
        "--lens",
        choices=("plain", "tuned", "both"),
        default="plain",
        help="the lens analysis reads with the plain class lens (default), a tuned one (per-block "
        "translators fitted on the run's images, saved in OUT/tuned_lens), or both side by side",
    )
    run.add_argument(
        "--tuned-lens",
        metavar="PATH",
        default=None,
        help="saved tuned-lens translators to read with instead of fitting them (with --lens "
        "tuned or both)",
    )


def _apply_lens_choice(args: argparse.Namespace, analyses: list, model: Any, dataset: Any) -> list:
    """Give the lens analysis its lens; for a tuned lens, load or fit the translators first."""
    lens = getattr(args, "lens", "plain")
    if getattr(args, "tuned_lens", None) and lens == "plain":
        raise ValueError("--tuned-lens needs --lens tuned or --lens both")
    if lens == "plain":
        return analyses
    from vit_embedding_lens.runner import distributed
    from vit_embedding_lens.runner.analyses.lens import LensAnalysis, prepare_tuned_lens

    if not any(isinstance(a, LensAnalysis) for a in analyses):
        raise ValueError(f"--lens {lens} needs the lens analysis among --analyses")
    translators, causal = prepare_tuned_lens(
        model,
        dataset,
        args.out,
        path=args.tuned_lens,
        batch_size=args.batch_size,
        refit=args.overwrite,
        progress=not args.no_progress,
        save=distributed.current().is_main,
    )
    for analysis in analyses:
        if isinstance(analysis, LensAnalysis):
            analysis.lens, analysis.tuned_lens, analysis.causal = lens, translators, causal
    return analyses


# -------------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------------
COMMANDS = {"models": cmd_models, "analyze": cmd_analyze, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``vit-lens``; returns the exit code (0 ok, 2 user error, 1 other failure)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from vit_embedding_lens.errors import ConversionError, UnsupportedArchitectureError
    from vit_embedding_lens.runner.manifest import ConfigMismatchError

    # OSError covers missing files and an unreachable model hub (the converter says what to do
    # instead)
    user_errors = (
        UnsupportedArchitectureError,
        ConversionError,
        ConfigMismatchError,
        ValueError,
        OSError,
    )
    try:
        return COMMANDS[args.command](args)
    except user_errors as err:
        if args.debug:
            raise
        print(f"vit-lens {args.command}: error: {err}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
