"""The class-embedding lens (Vilas et al., NeurIPS 2023): projections onto the class space, the
identifiability and change metrics, key-value memories, and their statistics (METHODS §1–§4)."""

from vit_embedding_lens.lens.baseline import random_init_twin
from vit_embedding_lens.lens.decomposition import (
    PoolDecomposition,
    RepresentationDecomposition,
    decompose_representation,
    mean_ablation,
    pool_decomposition,
)
from vit_embedding_lens.lens.group_tests import (
    class_vs_context_changes,
    kv_agreement_by_correctness,
)
from vit_embedding_lens.lens.memories import (
    class_value_agreement,
    compare_class_value_agreement,
    memory_values,
    top_memories,
    value_projection,
    value_topk,
)
from vit_embedding_lens.lens.memory_usage import (
    MemoryUsage,
    PerImageMemoryCounts,
    memory_usage,
    memory_usage_batch,
    memory_usage_per_image,
)
from vit_embedding_lens.lens.metrics import (
    change_rate_table,
    class_vs_context,
    compare_with_random,
    composition_table,
    identifiability_table,
    per_image_identifiability,
    summarize,
    token_groups,
)
from vit_embedding_lens.lens.projection import ClassProjection, pooled_readout, project
from vit_embedding_lens.lens.ranks import class_rank, identifiability_score
from vit_embedding_lens.lens.readings import logit_lens, project_head_writes, project_neuron_values
from vit_embedding_lens.lens.stats import (
    permutation_test_greater,
    significance_stars,
    wilcoxon_greater,
)
from vit_embedding_lens.lens.streaming import (
    LensRecorder,
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
    readout_kl,
)

__all__ = [
    "ClassProjection",
    "PoolDecomposition",
    "RepresentationDecomposition",
    "decompose_representation",
    "mean_ablation",
    "pool_decomposition",
    "LensRecorder",
    "MemoryUsage",
    "class_value_agreement",
    "compare_class_value_agreement",
    "memory_usage",
    "memory_usage_batch",
    "memory_usage_per_image",
    "PerImageMemoryCounts",
    "memory_values",
    "top_memories",
    "value_projection",
    "value_topk",
    "LensResult",
    "change_rate_table",
    "class_rank",
    "class_vs_context",
    "compare_with_random",
    "composition_table",
    "identifiability_score",
    "identifiability_table",
    "lens_batch",
    "lens_dataset",
    "lens_from_cache",
    "logit_lens",
    "per_image_identifiability",
    "permutation_test_greater",
    "pooled_readout",
    "project",
    "project_head_writes",
    "project_neuron_values",
    "random_init_twin",
    "significance_stars",
    "summarize",
    "token_groups",
    "wilcoxon_greater",
    "class_vs_context_changes",
    "kv_agreement_by_correctness",
    "TunedClassLens",
    "causal_check",
    "identifiability_comparison",
    "kl_table",
    "readout_kl",
]
