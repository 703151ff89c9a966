"""Plugins: extractors and matchers found through entry points (cbir.plugins), the matcher
interface, and the out-of-tree example package (examples/plugins/cbir-orb) installed from a
copy outside the repository and run end to end on the real photos of sceaux_castle."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir import plugins
from cbir.cli import main
from cbir.errors import CbirError

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "plugins" / "cbir-orb"


def cbir(*args, ok: bool = True) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def fake_package(site: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """An installed package as pip leaves one: its modules and a dist-info with entry points."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in entry_points.items()))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path that packages are 'installed' into for one test."""
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    plugins.forget()
    yield d
    plugins.forget()
    importlib.invalidate_caches()


# ---------------------------------------------------------------- the registry
def test_the_builtins_are_entry_points_of_cbir():
    for kind, names in {"local": {"sift", "rootsift", "r2d2", "aliked", "delg", "disk", "xfeat"},
                        "global": {"apgem", "netvlad", "densevlad", "delg", "eigenplaces", "megaloc", "boq"},
                        "matcher": {"nn"}, "converter": {"delg"}}.items():
        found = plugins.installed(kind)
        assert names <= set(found)
        assert all(found[n].package == "cbir" for n in names)


def test_unknown_names_are_one_line_listing_the_known_ones(sample_dataset):
    code, _, err = cbir("extract", sample_dataset, "--local", "surf", ok=False)
    assert code == 1 and err.count("\n") == 1
    assert "unknown local extractor 'surf' (known: aliked, delg, disk, r2d2, rootsift, sift" in err
    code, _, err = cbir("extract", sample_dataset, "--global", "apgem,bow", ok=False)
    assert code == 1
    assert "unknown global extractor 'bow' (known: apgem, boq, delg, densevlad, eigenplaces, megaloc, netvlad" in err
    code, _, err = cbir("match", "--query", sample_dataset, "--pairs", "-", "--local", "sift", "--matcher", "lg",
                        ok=False)
    assert code == 1 and err.count("\n") == 1 and "unknown matcher 'lg' (known: lightglue, nn" in err
    code, _, err = cbir("weights", "convert", "hardnet", sample_dataset, "x.pt", ok=False)
    assert code == 1 and "unknown weight converter 'hardnet' (known: delg" in err


def test_a_module_path_names_a_class_not_installed(sample_dataset):
    cbir("extract", sample_dataset, "--local", "cbir.models.sift:RootSIFT", "--max-keypoints", "50")
    assert (sample_dataset / "cbir" / "local" / "rootsift.h5").exists()
    code, _, err = cbir("extract", sample_dataset, "--local", "cbir.models.sift:l2_normalize", ok=False)
    assert code == 1 and "not a subclass of cbir.models.base.LocalExtractor" in err
    code, _, err = cbir("extract", sample_dataset, "--local", "no_such_module:X", ok=False)
    assert code == 1 and "ModuleNotFoundError: No module named 'no_such_module'" in err


def test_a_broken_plugin_is_one_line_and_breaks_nothing_else(site, sample_dataset):
    fake_package(site, "cbir-broken", {"cbir.extractors.local": {"broken": "cbir_broken:Broken"},
                                       "cbir.matchers": {"broken": "cbir_broken:Broken"}},
                 {"cbir_broken": "import numpy\nraise ImportError('needs libfoo 2.0')\n"})
    assert "broken" in plugins.names("local")
    code, _, err = cbir("extract", sample_dataset, "--local", "broken", ok=False)
    assert code == 1 and err.count("\n") == 1
    assert "the local extractor 'broken' (package cbir-broken, cbir_broken:Broken) cannot be loaded: " \
           "ImportError: needs libfoo 2.0" in err
    cbir("extract", sample_dataset, "--local", "sift", "--max-keypoints", "50")  # the others still work
    _, out, _ = cbir("weights", "list", "--json")
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert "needs libfoo 2.0" in rows["local", "broken"]["error"] and rows["local", "sift"]["package"] == "cbir"


def test_a_name_two_packages_claim_is_refused_naming_both(site, sample_dataset):
    fake_package(site, "cbir-other-sift", {"cbir.extractors.local": {"sift": "other_sift:SIFT"}},
                 {"other_sift": "from cbir.models.sift import SIFT\n"})
    code, _, err = cbir("extract", sample_dataset, "--local", "sift", ok=False)
    assert code == 1 and "installed by several packages (cbir, cbir-other-sift)" in err
    cbir("extract", sample_dataset, "--local", "cbir.models.sift:SIFT", "--max-keypoints", "50")


def test_help_lists_plugins_without_importing_them(site):
    fake_package(site, "cbir-lazy", {"cbir.extractors.local": {"lazy": "cbir_lazy:Lazy"},
                                     "cbir.extractors.global": {"lazyglobal": "cbir_lazy:Lazy"}},
                 {"cbir_lazy": "raise RuntimeError('imported')\n"})
    _, out, _ = cbir("extract", "--help")
    assert "[aliked|delg|disk|lazy|r2d2|rootsift|sift|xfeat]" in out.replace("\n", "").replace(" ", "")
    assert "lazyglobal" in out
    assert "cbir_lazy" not in sys.modules


def test_light_commands_import_no_plugin_and_no_torch():
    code = ("import sys; from click.testing import CliRunner; from cbir.cli import main; "
            "r = CliRunner().invoke(main, ['extract', '--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(main, ['match', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'cbir.models.', 'cbir.matching.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the matcher interface
def test_the_nn_matcher_records_what_stores_recorded_before_plugins():
    from cbir.matching import MatcherConf, load_matcher
    from cbir.matching.match import match_config

    nn = load_matcher("nn", {"ratio": 0.8})
    assert nn.identity() == {"mutual": True, "ratio": 0.8, "max_distance": None}  # no name: the earlier form
    assert match_config("sift", {}, nn, None) == match_config("sift", {}, MatcherConf(ratio=0.8), None)
    with pytest.raises(CbirError, match="unknown option.*nn matcher: 'radius'"):
        load_matcher("nn", {"radius": 3})


def test_binary_descriptors_are_refused_by_l2_matchers(sample_dataset, tmp_path):
    from cbir.io.store import StoreWriter

    store = sample_dataset / "cbir" / "local" / "bits.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (sample_dataset / "sensors" / "records_data").iterdir())[:2]
    with StoreWriter(store, "local-features", {"name": "bits", "descriptor_dim": 32, "descriptor_dtype": "uint8",
                                               "config": {"extractor": "bits", "metric_type": "Hamming"}}) as w:
        for n in names:
            w.add(n, keypoints=np.zeros((3, 2), np.float32), descriptors=np.zeros((3, 32), np.uint8),
                  scores=np.ones(3, np.float32))
    (tmp_path / "p.txt").write_text(f"{names[0]} {names[1]}\n")
    code, _, err = cbir("match", "--query", sample_dataset, "--pairs", tmp_path / "p.txt", "--local", "bits", ok=False)
    assert code == 1 and "descriptors compared by Hamming distance: the nn matcher matches L2 descriptors only" in err
    assert not (sample_dataset / "cbir" / "matches" / "bits-p.h5").exists()


# ---------------------------------------------------------------- the out-of-tree example
@pytest.fixture(scope="module")
def orb_site(tmp_path_factory) -> Path:
    """examples/plugins/cbir-orb copied outside the repository and installed from there by
    pip (no network, no build isolation: the setuptools of this environment)."""
    root = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(PLUGIN, root / "cbir-orb", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)], check=True)
    return site


@pytest.fixture
def orb(orb_site, monkeypatch):
    monkeypatch.syspath_prepend(str(orb_site))
    plugins.forget()
    yield
    plugins.forget()


def test_the_hamming_matcher_is_exact_mutual_nearest_neighbours(orb):
    from cbir.matching import load_matcher

    rng = np.random.default_rng(0)
    d0, d1 = rng.integers(0, 256, (300, 32), dtype=np.uint8), rng.integers(0, 256, (200, 32), dtype=np.uint8)
    d1[:50] = d0[100:150]  # exact copies: distance 0
    d1[50] = d0[100]  # a tie for row 100: the first column (0) wins
    bits0, bits1 = np.unpackbits(d0, axis=1), np.unpackbits(d1, axis=1)
    hamming = (bits0[:, None, :] != bits1[None, :, :]).sum(axis=2)
    nn01, nn10 = hamming.argmin(axis=1), hamming.argmin(axis=0)  # argmin: the first of equal minima
    for conf in ({}, {"max_distance": 100}, {"ratio": 0.9}, {"block_rows": 7}):
        matcher = load_matcher("hamming", conf)
        batch = matcher.batch()
        batch.add(*(matcher.prepare({"descriptors": d}, torch.as_tensor) for d in (d0, d1)))
        batch.finish()
        (matches, scores), = batch.results()
        i = np.arange(300)
        keep = nn10[nn01] == i
        if "max_distance" in conf:
            keep &= hamming[i, nn01] <= 100
        if "ratio" in conf:
            second = np.sort(hamming, axis=1)[:, 1]
            keep &= hamming[i, nn01] < 0.9 * second
        expected = np.stack([i[keep], nn01[keep]], axis=1)
        np.testing.assert_array_equal(matches, expected)
        np.testing.assert_array_equal(scores, (1 - hamming[i[keep], nn01[keep]] / 256).astype(np.float32))
    assert [100, 0] in matches.tolist()


@pytest.mark.slow
def test_the_example_plugin_runs_every_step_on_real_photos(orb, sceaux, tmp_path):
    """Installed from a copy outside the repo: extract, match (Hamming), map, localize,
    evaluate with the commands, then the pipeline from TOML."""
    root = shutil.copytree(sceaux, tmp_path / "sceaux")
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    m, q = root / "mapping", root / "query"
    _, out, _ = cbir("weights", "list", "--json")
    rows = {(r["kind"], r["name"]): r["package"] for r in json.loads(out)}
    assert rows["local", "orb"] == rows["matcher", "hamming"] == "cbir-orb"
    for ds in (m, q):
        _, out, _ = cbir("extract", ds, "--local", "orb", "--max-keypoints", "2000", "--json")
        assert json.loads(out)["extracted"] > 0
    cbir("pairs", "exhaustive", "--map", m, "-o", root / "map_pairs.txt")
    _, out, _ = cbir("match", "--query", m, "--pairs", root / "map_pairs.txt", "--local", "orb", "--matcher",
                     "hamming", "--verify", "poses", "--json")
    assert json.loads(out)["matched"] == 28
    cbir("map", m, "--local", "orb", "--matches", "orb-map_pairs", "--name", "orb-commands")
    cbir("pairs", "exhaustive", "--map", m, "--query", q, "-o", root / "q_pairs.txt")
    cbir("match", "--query", q, "--map", m, "--pairs", root / "q_pairs.txt", "--local", "orb", "--matcher", "hamming",
         "--verify")
    cbir("localize", "--query", q, "--map", m, "--pairs", root / "q_pairs.txt", "--local", "orb", "--matches",
         "orb-q_pairs", "--map-name", "orb-commands")
    _, out, _ = cbir("evaluate", "--query", q, "--gt", root / "query_gt", "--json")
    summary = json.loads(out)["conditions"]["all"]
    assert summary["localized"] == summary["queries"] == 3 and summary["within"][0] == 1.0
    # nn matches L2 descriptors: the store's metric says these are not
    code, _, err = cbir("match", "--query", m, "--pairs", root / "map_pairs.txt", "--local", "orb", "--name", "x",
                        ok=False)
    assert code == 1 and "the nn matcher matches L2 descriptors only" in err
    (root / "pipe.toml").write_text(
        '[datasets]\nmap = "mapping"\nquery = "query"\nquery_gt = "query_gt"\n'
        '[extract]\nlocal = "orb"\nglobal = ["densevlad"]\nlocal_conf = {max_keypoints = 2000}\n'
        'global_conf = {max_size = 320, clusters = 16}\n'
        '[retrieve]\ntopk = 5\nmap_pairs = 0\n[match]\nmatcher = "hamming"\n[localize]\nconfig = "config1"\n'
        '[report]\nwrite = false\n')
    _, out, _ = cbir("pipeline", root / "pipe.toml", "--json")
    result = json.loads(out)
    assert any("extract orb mapping: 0 new, 8 present" in s for s in result["steps"])  # the commands' store
    assert result["evaluation"]["all"]["within"][0] == 1.0
