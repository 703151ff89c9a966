"""Outputs record what made them; re-runs reuse, redo or refuse accordingly.

The end-to-end behaviour of `cbir pipeline` re-runs on the real photos is in
test_localization.py (it shares that module's pipeline run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.io.pairs import Pair, parse_pairs, read_pairs, read_pairs_record, write_pairs
from cbir.io.provenance import UNKNOWN, differences, digest, digest_names
from cbir.io.store import StoreWriter, open_store
from cbir.matching import MatcherConf, VerifyConf
from cbir.pipeline import DEFAULTS, load_config, plan
from cbir.retrieval import FusionConf, RetrievalConf


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- provenance
def test_differences_name_every_changed_leaf_and_skip_unknown_values():
    found = {"matcher": {"ratio": 0.8, "mutual": True}, "verify": {"max_error": 4.0}, "digest": "ab"}
    wanted = {"matcher": {"ratio": 0.9, "mutual": True}, "verify": {"max_error": 4.0, "seed": 0}, "digest": UNKNOWN}
    assert differences(found, wanted) == ["matcher.ratio: 0.8 -> 0.9", "verify.seed: (none) -> 0"]
    assert differences(found, found) == []


def test_names_digest_tells_every_list_of_names_apart():
    """An index records the digest of its images' names: equal lists agree, any change of a
    name or of the order differs, and a name holding a newline (ambiguous when joined) is
    digested as JSON, so ``["a", "b"]`` and ``["a\\nb"]`` differ."""
    names = [f"map/{i:05d}.jpg" for i in range(3000)]
    assert digest_names(names) == digest_names(list(names))
    assert digest_names(names) != digest_names(names[:-1] + ["map/x.jpg"])
    assert digest_names(names) != digest_names(names[::-1])
    assert digest_names(["a", "b"]) != digest_names(["a\nb"])
    assert digest_names(["a\nb"]) == digest(["a\nb"]) and digest_names([]) == digest([])
    assert digest_names(["[\"a\"]"]) != digest(["a"])  # a name that spells a JSON list


def _store(path: Path, values: dict[str, np.ndarray], config: dict) -> None:
    with StoreWriter(path, "global-features", {"name": "g", "config": config, "descriptor_dim": 2}) as w:
        for name, v in values.items():
            w.add(name, descriptors=v)


def test_store_fingerprint_follows_content_and_configuration(tmp_path):
    a = {"a.jpg": np.array([1, 0], np.float32), "b.jpg": np.array([0, 1], np.float32)}
    _store(tmp_path / "one.h5", a, {"k": 1})
    _store(tmp_path / "same.h5", a, {"k": 1})
    _store(tmp_path / "other_values.h5", {**a, "b.jpg": np.array([1, 1], np.float32)}, {"k": 1})
    _store(tmp_path / "other_config.h5", a, {"k": 2})
    _store(tmp_path / "more.h5", {**a, "c.jpg": np.array([1, 0], np.float32)}, {"k": 1})
    prints = {}
    for p in tmp_path.glob("*.h5"):
        with open_store(p) as s:
            prints[p.stem] = s.fingerprint()
    assert prints["one"] == prints["same"]
    assert len({prints[k] for k in ("one", "other_values", "other_config", "more")}) == 4


def test_pairs_files_carry_their_record_and_stay_readable_by_peers(tmp_path):
    pairs = [Pair("q.jpg", "m.jpg", 0.5)]
    record = {"step": "retrieve", "config": {"topk": 1}, "inputs": {"map": ["abc"]}}
    write_pairs(tmp_path / "p.txt", pairs, record)
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines[0] == "# query_image, map_image, score" and lines[1].startswith("# cbir: ")
    assert read_pairs(tmp_path / "p.txt") == pairs and read_pairs_record(tmp_path / "p.txt") == record
    # kapture-localization's reader skips '#' lines; hloc's layout has no record: None
    (tmp_path / "hloc.txt").write_text("q.jpg m.jpg\n")
    assert read_pairs_record(tmp_path / "hloc.txt") is None and read_pairs_record(tmp_path / "none.txt") is None
    assert parse_pairs("# cbir: {not json\nq.jpg, m.jpg, 1\n") == [Pair("q.jpg", "m.jpg", 1.0)]


# ---------------------------------------------------------------- one set of option rules
@pytest.mark.parametrize("make, message", [
    (lambda: RetrievalConf(topk=0), "topk must be >= 1"),
    (lambda: RetrievalConf(topk=2.5), "topk must be an integer"),
    (lambda: FusionConf("pow"), "unknown fusion 'pow'"),
    (lambda: FusionConf("gharm", weights=("a",)), "fusion weights must be numbers"),
    (lambda: MatcherConf(ratio=1.5), "ratio must be <= 1.0"),
    (lambda: MatcherConf(mutual="yes"), "mutual must be true or false"),
    (lambda: VerifyConf(max_error=0.0), "max_error must be > 0.0"),
    (lambda: VerifyConf(max_error=float("nan")), "max_error must be a finite number"),
    (lambda: VerifyConf(min_inliers=-1), "min_inliers must be >= 0"),
])
def test_step_options_are_checked_where_they_are_made(make, message):
    with pytest.raises(CbirError, match=message):
        make()


def _toml(tmp_path: Path, sample: Path, extra: str = "") -> Path:
    path = tmp_path / "pipe.toml"
    path.write_text(f'[datasets]\nmap = "{sample}"\nquery = "{sample}"\n[extract]\nlocal = "sift"\n'
                    f'global = ["densevlad"]\n{extra}')
    return path


@pytest.mark.parametrize("override, message", [
    ("retrieve.topk=0", "[retrieve] topk must be >= 1, got 0"),
    ("retrieve.map_pairs=-1", "[retrieve] map_pairs must be >= 0"),
    ('retrieve.fusion="pow"', "[retrieve] unknown fusion 'pow'"),
    ('retrieve.precision="fp8"', "[retrieve] unknown precision 'fp8'"),
    ("retrieve.precision=16", "[retrieve] unknown precision 16"),
    ('executor.kind="spark"', "[executor] unknown executor 'spark'"),
    ("executor.images_per_task=0", "[executor] images_per_task must be >= 1"),
    ("match.ratio=2", "[match] ratio must be <= 1.0"),
    ("match.min_inliers=1.5", "[match] min_inliers must be an integer"),
    ('extract.global=["densevlad", "nope"]', "[extract] unknown global extractor 'nope'"),
    ("extract.local_conf.max_keypoint=5",
         "[extract] local_conf: unknown option(s) 'max_keypoint' (did you mean 'max_keypoints'?) for sift"),
    ("extract.local_conf.max_keypoints=-5", "[extract] sift max_keypoints must be >= 0"),
    ('extract.local="r2d2"', "weight file 'r2d2_WASF_N16.pt' not found"),
    ('map.conf.min_num_matches="x"', "[map] option min_num_matches='x': expected a int"),
    ('localize.config="config9"', "[localize] unknown config 'config9'"),
    ('localize.conf.estimation.ransac.max_error="abc"', "[localize] cannot set option ransac.max_error"),
    ("localize.sequence_max_gap=-1", "[localize] sequence_max_gap must be >= 0"),
    ("evaluate.thresholds=[[0.5,200]]", "[evaluate] threshold (0.5 m, 200 deg)"),
    ("num_workers=-1", "num_workers must be in [0, 256]"),
    ("retrieve.topkk=3", "--set retrieve.topkk: unknown key 'topkk' (did you mean 'topk'?) in [retrieve]"),
])
def test_pipeline_configuration_is_checked_before_any_step(tmp_path, sample_dataset, override, message):
    before = sorted(sample_dataset.rglob("*"))
    r = run("pipeline", _toml(tmp_path, sample_dataset), "--set", override)
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(sample_dataset.rglob("*")) == before  # nothing ran


def test_pipeline_options_reach_free_tables_as_dotted_keys(tmp_path, sample_dataset):
    toml = _toml(tmp_path, sample_dataset, '[localize]\nconf = {estimation = {ransac = {max_error = 9}}}\n')
    conf = load_config(toml,
                       ["localize.conf.refinement.refine_focal_length=true"])
    p = plan(conf)
    assert p.localize_overrides == {"estimation.ransac.max_error": 9, "refinement.refine_focal_length": True}
    assert DEFAULTS["localize"]["conf"] == {}  # the defaults are never modified


def test_pipeline_check_lists_nothing_on_a_fresh_dataset(tmp_path, sample_dataset):
    r = run("pipeline", _toml(tmp_path, sample_dataset), "--check", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == {"changes": []}


# ---------------------------------------------------------------- DenseVLAD's model comes from the map
def test_densevlad_learns_only_when_asked(sample_dataset):
    r = run("extract", sample_dataset, "--global", "densevlad")
    assert r.exit_code == 1 and "--model" in r.output and "--learn" in r.output
    assert not (sample_dataset / "cbir" / "global" / "densevlad.model.h5").exists()
    r = run("extract", sample_dataset, "--global", "densevlad", "--learn", "--conf", "clusters=4", "--conf",
            "pca_dim=0")
    assert r.exit_code == 0, r.output
    assert (sample_dataset / "cbir" / "global" / "densevlad.model.h5").exists()
    # the model beside the store is reused by a later run without --learn
    r = run("extract", sample_dataset, "--global", "densevlad", "--conf", "clusters=4", "--conf", "pca_dim=0")
    assert r.exit_code == 0, r.output
    # another vocabulary size: the message says how to fix it
    r = run("extract", sample_dataset, "--global", "densevlad", "--conf", "clusters=8", "--conf", "pca_dim=0")
    assert r.exit_code == 1 and "--conf clusters=" in r.output and "--learn --overwrite" in r.output


def test_pipeline_phases_show_one_progress_at_a_time():
    """A step's phases (a Ray step's work, then the merge of its shards) each get their own
    progress, opened at the phase's first update after the previous one closed: a terminal
    shows one live display at a time."""
    from contextlib import contextmanager

    from cbir.pipeline import phases

    events, open_ = [], []

    @contextmanager
    def factory(label):
        assert not open_, f"{label} opened while {open_} is open"
        open_.append(label)
        events.append(("open", label))
        try:
            yield lambda advance, total: events.append((label, advance, total))
        finally:
            open_.remove(label)
            events.append(("close", label))

    with phases(factory, "work", "merge") as (work, merge):
        assert events == [("open", "work")]
        work(2, 4)
        work(2, 4)
        merge(1, 2)
        merge(1, 2)
    assert events == [("open", "work"), ("work", 2, 4), ("work", 2, 4), ("close", "work"), ("open", "merge"),
                      ("merge", 1, 2), ("merge", 1, 2), ("close", "merge")]
    with pytest.raises(RuntimeError, match="failed"):  # an error closes the phase it happened in
        with phases(factory, "work", "merge") as (work, merge):
            raise RuntimeError("failed")
    assert not open_
