"""benchmarks/results_page.py: the committed docs/RESULTS.md and README headline are what the
committed raw files give; a number on the page equals the same number computed straight from
a raw file; a newer lease of a setting replaces the older one."""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def rp(monkeypatch):
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_committed_page_and_readme_headline_are_up_to_date(rp, capsys):
    assert rp.main(["--check"]) == 0, capsys.readouterr().err


def test_check_names_a_stale_page(rp, monkeypatch, tmp_path, capsys):
    stale = tmp_path / "RESULTS.md"
    stale.write_text((ROOT / "docs" / "RESULTS.md").read_text().replace("1.115", "1.116"))
    monkeypatch.setattr(rp, "PAGE", stale)
    assert rp.main(["--check"]) == 1
    assert "out of date: " in capsys.readouterr().err


def _ratio_from_raw(path: Path) -> float:
    """Median over runs of DWDP's tokens/s per GPU over DEP's, read with json alone."""
    runs = json.loads(path.read_text())["runs"]
    return statistics.median(r["results"]["dwdp"]["tps_per_gpu"] / r["results"]["dep"]["tps_per_gpu"] for r in runs)


def test_headline_number_equals_the_raw_file(rp):
    raw = ROOT / "benchmarks/results/2026-11-28_full_depth_h200x4/full_depth_fp8_mnt32k_W4.json"
    row = next(line for line in (ROOT / "docs/RESULTS.md").read_text().splitlines()
               if line.startswith("| the same, MNT 32K |"))
    assert f"**{_ratio_from_raw(raw):.3f}**" in row
    assert f"**{_ratio_from_raw(raw):.3f}**" in (ROOT / "README.md").read_text()


def test_newer_lease_replaces_the_older_one(rp, monkeypatch, tmp_path):
    src = ROOT / "benchmarks/results/2026-11-28_full_depth_h200x4/full_depth_fp8_mnt32k_W4.json"
    old = tmp_path / "2026-11-28_full_depth_h200x4"
    new = tmp_path / "2026-12-01_full_depth_h100x4"
    old.mkdir()
    new.mkdir()
    shutil.copy(src, old / src.name)
    d = json.loads(src.read_text())
    for r in d["runs"]:
        r["results"]["dwdp"]["tps_per_gpu"] *= 1.5
    d["machine"]["gpus"] = ["NVIDIA H100 80GB HBM3"] * 4
    (new / "fd.json").write_text(json.dumps(d))
    monkeypatch.setattr(rp, "RESULTS", tmp_path)
    monkeypatch.setattr(rp, "_BENCH", None)
    (s,) = rp.settings({"dwdp", "dep"}, model="qwen3-235b-a22b", layers=None, mnt=32768)
    assert [p.parent.name for p in s.paths] == [new.name] * 3
    assert statistics.median(s.ratio("dwdp", "dep")) == pytest.approx(1.5 * _ratio_from_raw(src))
    stamp = rp.Stamp.of(s.paths).markdown()
    assert "4x NVIDIA H100 80GB HBM3" in stamp and "2026-12-01_full_depth_h100x4" in stamp and "Predates" not in stamp


def test_readme_without_markers_is_one_clear_error(rp):
    with pytest.raises(SystemExit, match="README.md lacks the markers"):
        rp.readme_with_headline("# dwdp\n")
