"""The names of retrieval's options, without torch: what the command line offers and
``--help`` lists. The modules that implement them import these and check that they agree."""

from __future__ import annotations

#: late fusion operators (:mod:`cbir.retrieval.fusion`); ``round_robin`` fuses rankings
FUSIONS = ("gharm", "harmonic_mean", "mean", "power", "mean_and_power", "mean_and_min", "min_and_max",
           "villena_roman", "min", "max", "round_robin")
#: other names of the operators, as kapture-localization and the papers spell them
ALIASES = {"generalized_harmonic_mean": "gharm", "maximum": "max", "minimum": "min"}
#: faiss indexes (:mod:`cbir.retrieval.index`)
INDEX_KINDS = ("flat", "ivf", "ivfpq", "lsh")
#: arithmetic of exact search's candidate bounds (:mod:`cbir.retrieval.search`)
PRECISIONS = ("fp32", "fp16", "bf16")
#: longest LSH code: its random rotation is a dense dim x bits matrix made orthonormal when
#: the index is created, in one faiss call that holds the interpreter (no Ctrl-C): 4096 bits
#: of an 8192-D descriptor take seconds, 16384 bits minutes
MAX_LSH_BITS = 4096
