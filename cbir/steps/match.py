"""The matching step: shards of pairs, in the order a local run writes them.

In place (the local executor) it is :func:`cbir.matching.match.main` over the pairs, into
the final store. Otherwise the driver plans the pairs (duplicates, self-pairs, pairs without
features: refused when none is left), keeps those the final store lacks and cuts them into
shards; each shard matches and verifies its pairs into its own store, which becomes a part of
the final (sharded) store (:mod:`cbir.steps.parts`); one written by an earlier run is kept if
it is whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..executor import Work
from ..io.store import open_store, present_keys
from . import cut, opened, portable, wants_gpu
from .parts import collect_parts, count, intact, merge_counter, plan_directory, remove_plan

if TYPE_CHECKING:
    from ..executor import Executor, Progress
    from ..io.dataset import Dataset
    from ..io.pairs import Pair
    from ..matching.match import MatchReport

#: the counts of a shard's report that add up into the step's
SUMMED = ("matched", "matches", "inliers", "verified_with_poses")


def match(executor: Executor, query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *,
          name: str | None = None, matcher: Any = None, verify: Any = None, device: str = "auto",
          overwrite: bool = False, num_workers: int | None = None, progress: Progress | None = None,
          merging: Progress | None = None, pairs_file: str | None = None) -> MatchReport:
    """:func:`cbir.matching.match.main` by ``executor``: ``progress(pairs, total)`` as pairs
    (shards) are done, then ``merging(parts, total)`` as shards' stores become the final store's parts."""
    from ..io.pairs import Pair
    from ..matching import match as match_mod
    from ..matching.nearest_neighbor import MatcherConf

    matcher = matcher or MatcherConf()
    if executor.in_place:
        work = Work(match_shard, {0: (portable(query, executor), portable(map_, executor), pairs, local, name,
                                      matcher, verify, device, None, overwrite, pairs_file, executor.sharded)},
                    ["every pair"], [0], threads=num_workers, progress=progress)
        [(_, report)] = executor.run(work)
        return report
    name = name or local
    same = query.root.resolve() == map_.root.resolve()
    planned, duplicates, self_pairs = match_mod.plan_pairs(pairs, same)
    final = query.store_path("matches", name)
    with open_store(query.store_path("local", local), "local-features") as qstore, \
            open_store(map_.store_path("local", local), "local-features") as mstore:
        match_mod.check_compatible(qstore, mstore)
        match_mod.as_matcher(matcher).check_features(qstore)
        skipped = match_mod.unmatchable_pairs(planned, query, map_, qstore, mstore)
        match_mod.require_matchable(planned, skipped, self_pairs, pairs_file)
        attrs = match_mod.store_attributes(name, local, qstore.config, matcher, verify)
    present = present_keys(final, "matches", attrs, overwrite)
    todo = [p for p in planned if p not in present and p not in skipped]
    shards = cut(todo, executor.sizes.pairs)
    plan = plan_directory(query.root, {"store": str(final), "config": attrs, "map": str(map_.root), "pairs": todo})
    outputs = [plan / f"{i:06d}" / "matches" / f"{name}.h5" for i in range(len(shards))]
    report = match_mod.MatchReport(final, already_present=len(planned) - len(todo) - len(skipped),
                                   duplicates=duplicates, pairs=len(planned) + len(self_pairs))
    report.missing_features += [(f"{a} {b}", "an image paired with itself") for a, b in self_pairs]
    report.missing_features += [(f"{a} {b}", why) for (a, b), why in skipped.items()]
    if progress:
        progress(report.already_present + len(skipped), len(planned))
    work = Work(match_shard, {i: (portable(query, executor), portable(map_, executor), [Pair(a, b) for a, b in shard],
                                  local, name, matcher, verify, device, str(outputs[i]), False, None, None)
                              for i, shard in enumerate(shards) if not intact(outputs[i])},
                [f"{a} {b}" for a, b in (s[0] for s in shards)], [len(s) for s in shards], len(planned),
                progress=progress, on_gpu=wants_gpu(device))
    for _, part in executor.run(work):
        add_report(report, part)
    collect_parts(final, outputs, "matches", attrs, keep=not overwrite,
                  progress=merge_counter(merging, sum(o.exists() for o in outputs)))
    report.matched = count(final) - report.already_present  # shards of an earlier run count as matched now
    remove_plan(plan)
    return report


def match_shard(query: Dataset | str, map_: Dataset | str, pairs: list[Pair], local: str, name: str | None,
                matcher: Any, verify: Any, device: str, out: str | None, overwrite: bool, pairs_file: str | None,
                sharded: bool | None, *, threads: int | None = None, progress: Progress | None = None) -> MatchReport:
    """One shard: :func:`cbir.matching.match.main` of ``pairs`` into the store ``out`` (None:
    the final store)."""
    from ..matching import match as match_mod

    return match_mod.main(opened(query), opened(map_), pairs, local, name=name, matcher=matcher, verify=verify,
                          device=device, overwrite=overwrite, num_workers=threads, progress=progress,
                          store_path=Path(out) if out else None, pairs_file=pairs_file, sharded=sharded)


def add_report(report: MatchReport, shard: MatchReport) -> None:
    """A shard's report added into the step's."""
    for key in SUMMED:
        setattr(report, key, getattr(report, key) + getattr(shard, key))
    report.missing_features += shard.missing_features
    report.ransac_fallbacks += shard.ransac_fallbacks
    for key, value in shard.seconds.items():
        report.seconds[key] += value
    report.device = shard.device
