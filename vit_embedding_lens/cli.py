"""The ``vit-lens`` command: ``models``, ``analyze`` and ``demo``.

    vit-lens models                         # which timm ViTs convert, which are refused and why
    vit-lens analyze --model vit_base_patch16_224.augreg_in21k_ft_in1k --pretrained \\
        --data /data/ImageNet-S --layout imagenet-s --preprocess paper --out runs/b16
    torchrun --nproc-per-node 4 -m vit_embedding_lens analyze ...   # data-parallel
    vit-lens demo                           # offline, bundled model and digits

``analyze`` is resumable: rerunning the same command continues where a killed run stopped; a
different configuration in the same ``--out`` is refused (``--overwrite`` starts over). Exit codes:
0 success, 2 a problem the user can fix (printed without a traceback), 1 anything else.

This module imports torch, timm and the package's floors only inside the commands, and checks the
arguments before anything heavy is imported, so ``--help``, ``--version`` and argument errors answer
at once.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

USER_ERROR = 2
DTYPE_NOTE = (
    "bfloat16/float16 logits agree with float32 to about 1e-2 relative (bf16 has 8 bits of "
    "mantissa); ranks of near-tied classes can differ, so compare such runs statistically"
)
#: the built-in analyses (runner.analyses.BUILTIN_ANALYSES, in order), named here so that help and
#: argument checks need no torch; a test keeps the two lists equal
ANALYSIS_NAMES = (
    "accuracy",
    "cls_identifiability",
    "lens",
    "knockout",
    "context_removal",
    "memories",
    "attribution",
    "circuits",
)
#: what runs without --analyses (runner.analyses.DEFAULT_ANALYSES)
DEFAULT_ANALYSIS_NAMES = tuple(
    n for n in ANALYSIS_NAMES if n not in ("cls_identifiability", "circuits")
)
#: --device values: auto, cpu, cuda, cuda:N, mps
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one worth showing) after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and "default" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


class _VersionAction(argparse.Action):
    """``--version``: reads the installed versions only when asked (importlib.metadata is not
    free)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_string())
        parser.exit()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def version_string() -> str:
    """``vit-lens 0.1.0 (torch 2.x, timm 1.x)``: read from the installed packages' metadata, so
    torch and timm are not imported."""
    from importlib import metadata

    from vit_embedding_lens import __version__

    found = []
    for dist in ("torch", "timm"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"vit-lens {__version__} ({', '.join(found)})"


# -------------------------------------------------------------------------------------------------
# Parser
# -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-lens",
        description=(
            "Class-embedding lens for timm Vision Transformers (Vilas et al., NeurIPS 2023)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the package version (and torch's and timm's) and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser(
        "models",
        help="timm ViT families the converter supports, and refusals with reasons",
        formatter_class=_HelpFormatter,
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
    models.add_argument("--no-progress", action="store_true", help="no progress bar")

    analyze = sub.add_parser(
        "analyze",
        help="run analyses over an image data set (resumable, torchrun-ready)",
        formatter_class=_HelpFormatter,
    )
    src = analyze.add_argument_group("model")
    src.add_argument(
        "--model",
        help="timm model name (with tag), bundled:mnist-vit / bundled:fashion-vit / "
        "bundled:mnist-clip, hf:NAME or a Hugging Face save_pretrained folder, or "
        "open_clip:ARCH[:PRETRAINED]",
    )
    src.add_argument(
        "--checkpoint",
        help="weights file for --model, or a timm model folder (config.json + weights)",
    )
    src.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights (needs the model hub)"
    )
    src.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="classes of the --model architecture's head (default: the --checkpoint head's "
        "rows, else timm's)",
    )
    names = src.add_mutually_exclusive_group()
    names.add_argument(
        "--class-names",
        metavar="A,B,C",
        help="comma-separated class names, one per class in index order (they also map "
        "class-subfolder names of --data to classes)",
    )
    names.add_argument(
        "--class-names-file",
        metavar="FILE",
        help="class names: a text file with one per line, or JSON (a list, or {index: name})",
    )
    src.add_argument(
        "--templates",
        metavar="T1|T2",
        help="CLIP-like models: prompt templates for the text-defined classes, '|'-separated, each "
        "with one {} for the class name (default: the model's own, else a short OpenAI ImageNet "
        "list)",
    )
    src.add_argument(
        "--class-embeddings",
        metavar="DIR",
        help="CLIP-like models: a saved ClassSpace folder (class_space.safetensors + .json) used "
        "as the zero-shot head instead of the text tower",
    )
    data = analyze.add_argument_group("data")
    data.add_argument(
        "--data", required=True, help="image folder (DIR/<class>/*.jpg) or ImageNet-S root"
    )
    data.add_argument(
        "--layout",
        choices=("auto", "folder", "imagenet-s"),
        default="auto",
        help="how --data is organized; auto: imagenet-s when <data>/<split>-segmentation or "
        "<data>/ImageNetS919 exists, else folder",
    )
    data.add_argument(
        "--per-class",
        type=_positive_int,
        default=None,
        help="first N images per class (sorted names); default: all, ImageNet-S 5",
    )
    data.add_argument("--split", default="validation", help="ImageNet-S split folder")
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
        "demo",
        help="offline demo: a bundled ViT and its eval images, with foreground masks",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument(
        "--bundled",
        default="mnist-vit",
        help="which bundled model: mnist-vit (digits) or fashion-vit (Fashion-MNIST)",
    )
    demo.add_argument(
        "--n-images",
        "--n",
        dest="n",
        type=_positive_int,
        default=None,
        help="first N eval images (default: all 500); under torchrun spell it --n-images (its "
        "parser takes --n for its own --nnodes)",
    )
    _add_run_options(demo, default_out="vit-lens-demo")
    return parser


def _add_run_options(p: argparse.ArgumentParser, default_out: Optional[str] = None) -> None:
    run = p.add_argument_group("run")
    run.add_argument(
        "--preset",
        choices=("library", "paper"),
        default="library",
        help="library: the library's definitions; paper: every choice where the "
        "reference code differs by design set to the reference's (knockout post-softmax, corner "
        "token labels, double-softmax attribution loss, CLS-inclusive percentages), to reproduce "
        "published numbers",
    )
    run.add_argument(
        "--analyses",
        default=None,
        metavar="A,B,...",
        help=(
            f"comma-separated analyses, from: {', '.join(ANALYSIS_NAMES)} (default: "
            f"{','.join(DEFAULT_ANALYSIS_NAMES)}; cls_identifiability is a lighter part of lens; "
            "circuits runs only when named, see --circuit-classes)"
        ),
    )
    run.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch")
    run.add_argument(
        "--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N or mps"
    )
    run.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help=DTYPE_NOTE
    )
    run.add_argument(
        "--num-workers",
        type=_non_negative_int,
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
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_lens_options(run)
    _add_circuit_options(p)


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


# -------------------------------------------------------------------------------------------------
# Argument checks: before any heavy import or model loading
# -------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError (FileNotFoundError for a missing path) naming the first bad argument; needs
    neither torch nor the model, so a typo fails at once."""
    if args.command not in ("analyze", "demo"):
        return
    if not DEVICE_PATTERN.fullmatch(args.device):
        raise ValueError(
            f"--device {args.device!r} is not a device: use auto (CUDA when present), cpu, cuda, "
            f"cuda:N or mps"
        )
    if args.analyses is not None:
        # the built-ins, and analyses a script registered before calling main() (read only if
        # the runner's registry is already imported: importing it would import torch)
        registry = sys.modules.get("vit_embedding_lens.runner.analysis")
        known = list(ANALYSIS_NAMES)
        known += [n for n in getattr(registry, "ANALYSES", {}) if n not in known]
        names = [n.strip() for n in args.analyses.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            raise ValueError(
                f"--analyses {args.analyses!r}: unknown {unknown or 'empty list'}; choose from "
                f"{', '.join(known)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"--analyses {args.analyses!r} names an analysis twice")
    _check_circuit_args(args)
    if args.tuned_lens is not None:
        if args.lens == "plain":
            raise ValueError("--tuned-lens needs --lens tuned or --lens both")
        if not Path(args.tuned_lens).exists():
            raise FileNotFoundError(f"--tuned-lens {args.tuned_lens} does not exist")
    if args.command == "demo":
        return
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    if not data.is_dir():
        raise ValueError(f"--data {data} is a file; give the folder of images")
    for flag in (
        "checkpoint",
        "categories",
        "synset_mapping",
        "class_names_file",
        "class_embeddings",
    ):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {value} does not exist")
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold} is not an area fraction in (0, 1]")
    bundled = args.model is not None and args.model.strip().startswith("bundled:")
    folder = args.model is None or args.model.strip().startswith("local-dir:")
    if args.num_classes is not None and (bundled or folder):
        raise ValueError(
            "--num-classes sizes a timm architecture's head: give it with --model ARCH (a bundled "
            "model or a timm folder's config.json sets its own)"
        )
    templates_of(args)
    given = class_names_of(args)
    if given is not None and args.num_classes is not None and len(given) != args.num_classes:
        raise ValueError(f"{len(given)} class names given for --num-classes {args.num_classes}")


def templates_of(args: argparse.Namespace) -> Optional[List[str]]:
    """The prompt templates ``--templates`` gives (None without it); each needs one ``{}``."""
    if getattr(args, "templates", None) is None:
        return None
    templates = [t.strip() for t in args.templates.split("|") if t.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"--templates {args.templates!r}: give '|'-separated templates, each with exactly one "
            f"{{}} for the class name (bad: {bad or 'none given'})"
        )
    return templates


def class_names_of(args: argparse.Namespace) -> Optional[List[str]]:
    """The class names ``--class-names`` or ``--class-names-file`` give (None without either)."""
    if getattr(args, "class_names", None) is not None:
        names = [n.strip() for n in args.class_names.split(",")]
        where = "--class-names"
    elif getattr(args, "class_names_file", None) is not None:
        path = Path(args.class_names_file)
        where = f"--class-names-file {path}"
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON: {err}") from None
            if isinstance(loaded, dict):
                try:
                    order = sorted(loaded, key=int)
                except ValueError:
                    raise ValueError(
                        f'{where}: a JSON object maps class indices to names ({{"0": "cat"}})'
                    ) from None
                if [int(k) for k in order] != list(range(len(order))):
                    raise ValueError(f"{where}: class indices must be 0..{len(order) - 1}")
                loaded = [loaded[k] for k in order]
            if not isinstance(loaded, list) or not all(isinstance(n, str) for n in loaded):
                raise ValueError(f"{where}: expected a JSON list of names or {{index: name}}")
            names = [n.strip() for n in loaded]
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        return None
    if not names or any(not n for n in names):
        raise ValueError(f"{where}: class names must be non-empty, got {names}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where}: class names given twice: {twice}")
    return names


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return name


def _check_hub(name: str) -> None:
    """Fail at once, not after the hub client's retries, when ``--pretrained`` weights can neither
    be downloaded (one short probe) nor read from the local cache; cached weights without a hub
    are read offline."""
    from vit_embedding_lens.errors import HubUnreachableError
    from vit_embedding_lens.loading.hub import hub_reachable, pretrained_cached, use_cache_only

    if hub_reachable(timeout=3.0):
        return
    if pretrained_cached(name):
        use_cache_only()  # no network: read the cached weights without the client's retries
        return
    reason = (
        "the model hub is unreachable (no network, or HF_HUB_OFFLINE is set) and the weights are "
        "not in the local cache"
    )
    raise HubUnreachableError(f"{name}: {reason}", model=name, reason=reason)


def _hub_message(err: Any) -> str:
    """What to do when pretrained weights cannot be downloaded, in the command line's terms."""
    detail = (err.reason or str(err)).rstrip(".")
    return (
        f"could not fetch the pretrained weights of {err.model}: {detail}. Offline, pass weights "
        f"you have: --model ARCH --checkpoint FILE (safetensors or a torch state dict, with "
        f"--num-classes / --class-names for a fine-tuned head) or --checkpoint DIR (a timm model "
        f"folder); or try `vit-lens demo` (a bundled model, no download)"
    )


def _detect_layout(data: Path, split: str) -> str:
    markers = (data / f"{split}-segmentation", data / "ImageNetS919")
    return "imagenet-s" if any(m.is_dir() for m in markers) else "folder"


def cmd_analyze(args: argparse.Namespace) -> int:
    from vit_embedding_lens.data.transforms import resolve_preprocessing
    from vit_embedding_lens.loading import parse_model_name
    from vit_embedding_lens.runner import distributed
    from vit_embedding_lens.runner.models import load_model

    source = parse_model_name(args.model, args.checkpoint)  # a bad name fails before any work
    class_names = class_names_of(args)
    device = _resolve_device(args.device)
    if args.pretrained and source.kind in ("timm", "checkpoint"):
        _check_hub(source.name)
    ctx = distributed.init_distributed(device)
    try:
        device = str(distributed.device_for(ctx, device))
        loaded = load_model(
            args.model,
            args.checkpoint,
            args.pretrained,
            device=device,
            dtype=args.dtype,
            num_classes=args.num_classes,
            class_names=class_names,
            templates=templates_of(args),
            class_embeddings=args.class_embeddings,
        )
        model = loaded.model
        preprocessing = resolve_preprocessing(model, args.preprocess, loaded.data_config)
        data = Path(args.data)
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
    from vit_embedding_lens.runner import distributed
    from vit_embedding_lens.runner.models import load_model
    from vit_embedding_lens.zoo.bundled import bundled_spec

    device = _resolve_device(args.device)
    spec = bundled_spec(args.bundled)
    ctx = distributed.init_distributed(device)  # under torchrun the ranks share the batches
    try:
        device = str(distributed.device_for(ctx, device))
        loaded = load_model(
            ModelSource("bundled", spec.name).label, device=device, dtype=args.dtype
        )
        dataset = bundled_eval_dataset(
            loaded.model, n=args.n, name=spec.name, token_labels=_preset(args).token_labels
        )
        if ctx.is_main:
            print(
                f"{loaded.model!r}\n{len(dataset)} bundled eval images ({spec.foreground} masks as "
                f"segmentation) on {device}, {args.dtype}"
            )
        run_config = {"model_spec": loaded.spec}
        return _run_and_report(
            args,
            loaded.model,
            dataset,
            run_config,
            title=f"vit-lens demo: bundled {spec.name}",
            ctx=ctx,
        )
    finally:
        distributed.shutdown()


def _run_and_report(
    args: argparse.Namespace,
    model: HookedViT,
    dataset: Any,
    run_config: dict,
    title: str,
    ctx: Any = None,
) -> int:
    from vit_embedding_lens.presets import preset_analyses
    from vit_embedding_lens.report import format_headlines
    from vit_embedding_lens.runner import run_analyses
    from vit_embedding_lens.runner.summarize import write_run_report

    preset = _preset(args)
    analyses = preset_analyses(args.analyses.split(",") if args.analyses else None, preset)
    analyses = _apply_lens_choice(args, analyses, model, dataset)
    analyses = _apply_circuit_options(args, analyses, model, dataset)
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
    report = write_run_report(out, results, analyses, model, meta)
    print()
    print(format_headlines(report.headlines))
    print(f"\nreport: {report.page}")
    if report.failures:  # a bug, not the user's: the rest of the report is written
        for f in report.failures:
            print(f"report: {f['analysis']} ({f['part']}) failed: {f['error']}", file=sys.stderr)
        print(
            f"the tracebacks are in {out / 'manifest.json'} (report.failures); please report them",
            file=sys.stderr,
        )
        return 1
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
# The circuits analysis (--circuit-*)
# -------------------------------------------------------------------------------------------------
CIRCUIT_FLAGS = ("classes", "corruption", "method", "target", "images")


def _add_circuit_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("circuits (with --analyses ...,circuits)")
    group.add_argument(
        "--circuit-classes",
        metavar="A,B",
        default=None,
        help="the class pair whose decision the circuit carries, by name or index (A,B: logit "
        "difference A - B on images of A, against images of B), or A,rest (A against its "
        "strongest other class, on images of A); default: the first two classes",
    )
    group.add_argument(
        "--circuit-corruption",
        default=None,
        choices=("pair", "noise", "blur", "mean", "swap", "mean-ablation"),
        help="what an ablated edge carries: its value on a counterfactual image, either an image "
        "of the other class (pair; default) or the image with its patches corrupted (noise, "
        "blur, mean: its mean colour, swap: the patches of an image of the other class); or "
        "mean-ablation (its mean over the scored images of both classes)",
    )
    group.add_argument(
        "--circuit-method",
        default=None,
        choices=("eap", "eap-ig"),
        help="edge scores: eap (one gradient) or eap-ig (integrated gradients; default)",
    )
    group.add_argument(
        "--circuit-target",
        type=float,
        default=None,
        metavar="SHARE",
        help="the share of the metric the minimal circuit must recover, in (0, 1] (default 0.8)",
    )
    group.add_argument(
        "--circuit-images",
        type=_positive_int,
        default=None,
        metavar="N",
        help="images the edges are scored on (the first N of the class pair; default 32); "
        "faithfulness is measured on all of them",
    )


def _circuit_options(args: argparse.Namespace) -> dict:
    """The ``--circuit-*`` options given, as the circuits analysis's keyword arguments."""
    given = {f: getattr(args, f"circuit_{f}", None) for f in CIRCUIT_FLAGS}
    return {f: v for f, v in given.items() if v is not None}


def _check_circuit_args(args: argparse.Namespace) -> None:
    """The ``--circuit-*`` options that can be checked without torch."""
    options = _circuit_options(args)
    if not options:
        return
    names = [n.strip() for n in (args.analyses or "").split(",")]
    if "circuits" not in names:
        flags = ", ".join(f"--circuit-{f}" for f in options)
        raise ValueError(
            f"{flags} configure the circuits analysis: add it with --analyses circuits"
        )
    target = options.get("target")
    if target is not None and not 0.0 < target <= 1.0:
        raise ValueError(f"--circuit-target {target} is not a share of the metric in (0, 1]")
    classes = options.get("classes")
    if classes is not None:
        parts = [c.strip() for c in classes.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"--circuit-classes {classes!r}: give two classes, A,B (or A,rest), by name or "
                "index"
            )
        if parts[0] == parts[1]:
            raise ValueError(f"--circuit-classes {classes!r}: a class pair needs two classes")


def _apply_circuit_options(
    args: argparse.Namespace, analyses: list, model: Any, dataset: Any
) -> list:
    """Configure the circuits analysis from ``--circuit-*`` and score its edges on the run's
    images (saved in OUT/circuits, so a resumed run reuses them)."""
    from vit_embedding_lens.runner.analyses.circuits import CircuitsAnalysis

    out = []
    for analysis in analyses:
        if isinstance(analysis, CircuitsAnalysis):
            from vit_embedding_lens.runner import distributed

            analysis = CircuitsAnalysis(**{**analysis.options(), **_circuit_options(args)})
            analysis.prepare(
                model,
                dataset,
                args.out,
                batch_size=args.batch_size,
                rescore=args.overwrite,
                save=distributed.current().is_main,
            )
        out.append(analysis)
    return out


# -------------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------------
COMMANDS = {"models": cmd_models, "analyze": cmd_analyze, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``vit-lens``; returns the exit code (0 ok, 2 user error, 1 other failure)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from vit_embedding_lens.errors import (
        ConversionError,
        HubUnreachableError,
        RunFolderLockedError,
        UnsupportedArchitectureError,
    )

    # ConfigMismatchError (a different run in --out) is a ValueError; OSError covers missing files
    # and an unreachable model hub (HubUnreachableError, said in the command line's terms). Not
    # imported here: runner/ imports torch, and argument errors must answer at once.
    user_errors = (
        UnsupportedArchitectureError,
        ConversionError,
        RunFolderLockedError,
        ValueError,
        OSError,
    )
    try:
        check_args(args)
        from vit_embedding_lens.runner.manifest import recorded_command_line

        # called in-process with arguments: record them as the command line, not the interpreter's
        command = None if argv is None else shlex.join(["vit-lens", *argv])
        with recorded_command_line(command):
            return COMMANDS[args.command](args)
    except user_errors as err:
        if args.debug:
            raise
        message = _hub_message(err) if isinstance(err, HubUnreachableError) else str(err)
        print(f"vit-lens {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
