"""Whole-data-set runs: the analysis plug-in interface, a resumable, crash-safe runner that also
runs data-parallel under ``torchrun``, and reading the results back.

    from vit_embedding_lens.runner import run_analyses, load_results
    results = run_analyses(model, dataset, ["accuracy", "cls_identifiability"], "out/")
    results["accuracy"]["pred"]        # per image, in data set order
"""

from vit_embedding_lens.runner.analysis import (
    ANALYSES,
    Analysis,
    available_analyses,
    build_analyses,
    register_analysis,
)
from vit_embedding_lens.runner.batch import Batch, collate
from vit_embedding_lens.runner.lock import ForeignFileError, RunFolderLockedError
from vit_embedding_lens.runner.manifest import ConfigMismatchError
from vit_embedding_lens.runner.results import IncompleteRunError, RunResults, load_results
from vit_embedding_lens.runner.run import UnusableImageWarning, run_analyses, run_fingerprint
from vit_embedding_lens.runner.summarize import (
    RunReport,
    summarize_run,
    write_run_report,
)

__all__ = [
    "ANALYSES",
    "Analysis",
    "Batch",
    "ConfigMismatchError",
    "ForeignFileError",
    "IncompleteRunError",
    "RunFolderLockedError",
    "RunReport",
    "RunResults",
    "UnusableImageWarning",
    "available_analyses",
    "build_analyses",
    "collate",
    "load_results",
    "register_analysis",
    "run_analyses",
    "run_fingerprint",
    "summarize_run",
    "write_run_report",
]
