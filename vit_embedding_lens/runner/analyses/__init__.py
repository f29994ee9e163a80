"""Built-in analyses, registered on import (:data:`BUILTIN_ANALYSES`)."""

from vit_embedding_lens.runner.analyses.accuracy import Accuracy
from vit_embedding_lens.runner.analyses.attribution import AttributionBenchmark
from vit_embedding_lens.runner.analyses.circuits import CircuitsAnalysis
from vit_embedding_lens.runner.analyses.cls_identifiability import ClsIdentifiability
from vit_embedding_lens.runner.analyses.context_removal import ContextRemoval
from vit_embedding_lens.runner.analyses.knockout import KnockoutAnalysis
from vit_embedding_lens.runner.analyses.lens import LensAnalysis
from vit_embedding_lens.runner.analyses.memories import MemoriesAnalysis
from vit_embedding_lens.runner.analysis import ANALYSES, register_analysis

#: the built-ins; more analyses of the library are added here (name -> factory)
BUILTIN_ANALYSES = {
    "accuracy": Accuracy,
    "cls_identifiability": ClsIdentifiability,
    "lens": LensAnalysis,
}
BUILTIN_ANALYSES["knockout"] = KnockoutAnalysis
BUILTIN_ANALYSES["context_removal"] = ContextRemoval
BUILTIN_ANALYSES["memories"] = MemoriesAnalysis
BUILTIN_ANALYSES["attribution"] = AttributionBenchmark
BUILTIN_ANALYSES["circuits"] = CircuitsAnalysis

#: what ``vit-lens demo`` and ``analyze`` run unless ``--analyses`` says otherwise (the paper's
#: analyses; ``cls_identifiability`` is a lighter subset of ``lens``; ``circuits`` studies one
#: class pair, scores its edges before the run and runs dozens of circuits per image of the
#: class, so it runs only when named)
DEFAULT_ANALYSES = [
    name for name in BUILTIN_ANALYSES if name not in ("cls_identifiability", "circuits")
]

for _name, _factory in BUILTIN_ANALYSES.items():
    if _name not in ANALYSES:  # a user's own registration under the same name wins
        register_analysis(_name, _factory)

__all__ = [
    "BUILTIN_ANALYSES",
    "DEFAULT_ANALYSES",
    "Accuracy",
    "AttributionBenchmark",
    "CircuitsAnalysis",
    "ClsIdentifiability",
    "ContextRemoval",
    "KnockoutAnalysis",
    "LensAnalysis",
    "MemoriesAnalysis",
]
