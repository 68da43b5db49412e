"""benchmarks/suite.py: steps planned by GPU count and repetitions, skipped when the budget
cannot hold them, and stopped with every process they started when their limit runs out."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "benchmarks" / "suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_plan_leaves_out_what_needs_more_gpus_and_names_repetitions(suite):
    one = [name for _, name in suite.plan(["strategies", "decode"], 3, 1)]
    assert one == ["decode"]  # every strategies step and kv_handoff need 2+ GPUs
    four = [name for _, name in suite.plan(["full-depth"], 3, 4)]
    assert four[:3] == ["full_depth_mnt16k_skew0_rep1", "full_depth_mnt16k_skew0_rep2", "full_depth_mnt16k_skew0_rep3"]
    assert len(four) == 4 * 3
    assert [name for _, name in suite.plan(["kernels"], 3, 1)][0] == "vendor_kernels"  # not repeated


def test_every_suite_step_names_a_script_that_exists(suite):
    for _, steps in suite.SUITES.values():
        for st in steps:
            for a in st.argv:
                if a.endswith(".py") and "benchmarks" in a:
                    assert Path(a).exists(), a
                if a.startswith("tests/"):
                    assert (ROOT / a).exists(), a


def test_unknown_suite_is_one_clear_error(suite, capsys):
    with pytest.raises(SystemExit):
        suite.main(["nope", "--dry-run"])
    err = capsys.readouterr().err
    assert "unknown suite nope" in err and "kernels" in err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_budget_skips_and_limit_stops_the_whole_process_group(suite, tmp_path):
    # The step starts a child of its own (as bench starts its ranks), prints its pid and hangs.
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
            " print(p.pid, flush=True); time.sleep(300)")
    runner = suite.Runner(tmp_path, budget_s=100, gpus=1)
    long = suite.Step("too_long", [sys.executable, "-c", "print('never')"], expect_s=1000, limit_s=2000)
    stuck = suite.Step("stuck", [sys.executable, "-c", hang], expect_s=0, limit_s=1.5)
    done = suite.Step("quick", [sys.executable, "-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[1], 'w'))",
                                "{out}"], expect_s=0, limit_s=60)
    recs = runner.run_all([(long, "too_long"), (stuck, "stuck"), (done, "quick")])
    assert recs[0]["status"].startswith("skipped") and recs[0]["argv"] is None
    assert not (tmp_path / "too_long.txt").exists()
    assert recs[1]["status"].startswith("stopped")
    grandchild = int((tmp_path / "stuck.txt").read_text().split()[0])
    assert not _alive(grandchild), "the step's own child survived its stop"
    assert recs[2]["status"] == "ok" and json.loads((tmp_path / "quick.json").read_text()) == {"x": 1}
    log = (tmp_path / "log.txt").read_text()
    assert "too_long skipped" in log and "stuck stopped" in log and "quick ok" in log
