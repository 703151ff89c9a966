"""The whole chain in one call (``cbir pipeline``): extract -> retrieve (fusion) -> match ->
verify -> map -> localize -> post-process -> evaluate, from one TOML configuration.

Every step is the library's own step function, so the pipeline does exactly what the
separate commands do. Re-runs work as a build tool's:

- the whole configuration is checked (every option's type and range, every name, the
  weights present) before any step runs, with the rules of the commands;
- every output records the configuration it came from (stores and maps: ``config``;
  pairs files: their ``# cbir:`` line; localization: ``run.json``). A re-run compares them
  with the configuration first: unchanged steps are reused (stores resume where an
  interrupted run stopped; a map or a localization made from changed inputs is redone);
- a step whose configuration changed is refused, before anything runs, unless
  ``overwrite``: then it and every step after it are redone and **their outputs replaced**
  (the names stay; keep a result by copying it, or by pointing the configuration at copies
  of the datasets). ``from_step`` redoes a step and the ones after it in any case.

Configuration (every key optional except the datasets; ``--set a.b=value`` overrides)::

    [datasets]
    map = "path/to/map"          # kapture dataset with poses
    query = "path/to/query"
    query_gt = "path/to/query_gt" # optional: ground truth for the evaluation
    [extract]
    local = "sift"               # sift, rootsift, r2d2, delg
    global = ["densevlad"]       # apgem, netvlad, densevlad, delg; several: late fusion
                                 # (local and global delg with the same max_size and
                                 # scales run the network once for both; DenseVLAD learns
                                 # its vocabulary on the map, the queries use it)
    weights = "path/to/weights"  # directory or file, for the networks
    local_conf = {}              # extractor options
    global_conf = {}
    [retrieve]
    fusion = "gharm"
    topk = 20                    # query x map pairs
    map_pairs = 20               # map x map pairs by retrieval; 0: every pair
    precision = "fp32"           # "fp16": half-precision search, candidates rescored (same pairs)
    hash = ""                    # a hash model (cbir hash train): retrieve by the binary codes of
                                 # the one global store (written as <global>-<method><bits>)
    [match]
    matcher = "nn"               # an installed matcher (cbir weights list), or module:Class
    conf = {}                    # its options
    ratio = 0.0                  # nn: Lowe's ratio (0: off)
    mutual = true                # nn: mutual nearest neighbours only
    max_error = 4.0              # verification (px)
    min_inliers = 15
    map_verify = "poses"         # map x map pairs: "poses" (their known epipolar geometry;
                                 # RANSAC for a pair without) or "ransac"; queries: RANSAC
    [map]
    conf = {}                    # config1 overrides / pycolmap options
    [localize]
    config = "config2"
    conf = {}
    rig = false
    rig_max_gap = 0
    sequence = false
    sequence_max_gap = 1
    [evaluate]
    thresholds = [[0.25, 2.0], [0.5, 5.0], [5.0, 10.0]]
    [report]                     # QUERY/cbir/localization/<name>/report.html (cbir report)
    write = true
    max_points = 100000          # 3D points shown at most
    thumb_size = 160
    [executor]                   # where extraction, retrieval, matching and pose estimation run
    kind = "local"               # or "ray": tasks on a Ray cluster (cbir[ray]; datasets on a shared file system)
    address = ""                 # the cluster ("": $RAY_ADDRESS, else a local Ray instance)
    images_per_task = 64
    map_images_per_task = 100000 # retrieval: map images a task searches for every query
    pairs_per_task = 1000
    queries_per_task = 100
"""

from __future__ import annotations

from .changes import Change, changes
from .config import DEFAULTS, FREE_TABLES, load_config, unknown_key_message
from .plan import LEARNED_KEYS, Plan, plan
from .run import PipelineResult, ProgressFactory, no_progress, phases, run

__all__ = ["DEFAULTS", "FREE_TABLES", "LEARNED_KEYS", "Change", "PipelineResult", "Plan", "ProgressFactory",
           "changes", "load_config", "no_progress", "phases", "plan", "run", "unknown_key_message"]
