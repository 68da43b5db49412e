"""Starting groups: several at once never collide on a port; failures reach the user once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dwdp.cli import main
from dwdp.parallel.launch import SpawnError, spawn_local
from dwdp_workers import allreduce_worker


def test_groups_started_at_the_same_time_do_not_collide():
    """Each spawn hosts its own rendezvous store on a port the OS gave it and kept open
    (the old spawner picked a free port and let rank 0 bind it later: EADDRINUSE)."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(spawn_local, allreduce_worker, 2, (2,), 120) for _ in range(4)]
        results = [f.result() for f in futures]
    assert results == [[3, 3]] * 4


def test_impossible_placement_fails_before_any_process_starts(monkeypatch, capsys):
    def no_spawn(*a, **k):
        raise AssertionError("spawned ranks for a placement that cannot work")

    monkeypatch.setattr("dwdp.parallel.launch.spawn_local", no_spawn)
    assert main(["run", "-N", "5", "-L", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Valid L: 4, 8" in err and "Traceback" not in err


def test_spawn_error_summary_says_each_failure_once():
    e = SpawnError({0: "ValueError: bad thing\nTraceback ...", 1: "ValueError: bad thing\nTraceback ...",
                    2: "PeerFailure: rank 1 died\nTraceback ..."})
    assert e.summary() == "ranks 0, 1: ValueError: bad thing\nrank 2: PeerFailure: rank 1 died"
    assert "Traceback" in str(e)  # the full reports stay available


def test_a_failing_group_is_one_clean_error(tmp_path, capsys):
    """Every rank fails the same way inside the group (a checkpoint without the weights):
    the user reads the failure once, without tracebacks, and the exit code is 1."""
    import json

    import torch
    from safetensors.torch import save_file

    from dwdp.presets import preset_hf_dict

    (tmp_path / "config.json").write_text(json.dumps(preset_hf_dict("tiny-qwen3-moe")))
    save_file({"unrelated": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert main(["run", "-N", "2", "--model", str(tmp_path), "--prompt", "1,2,3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the group failed:\nranks 0, 1: CheckpointError:"), err
    assert "Traceback" not in err


def test_two_torchrun_nodes_form_node_local_dwdp_groups(tmp_path):
    """Two torchrun agents on 127.0.0.1 act as two nodes (--nnodes 2, c10d
    rendezvous) and form W/N = 2 DWDP groups of 2, each inside one node; every sequence's
    next token equals the single-process model's."""
    import json
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dwdp-test", "-m", "dwdp.cli", "run", "-N", "2",
           "--out", str(tmp_path / "out.json")]
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
              for _ in range(2)]
    logs = []
    for a in agents:
        try:
            logs.append(a.communicate(timeout=240)[0].decode(errors="replace"))
        finally:
            a.kill()
    assert all(a.returncode == 0 for a in agents), "\n".join(x[-2000:] for x in logs)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text())[0] for r in range(4)]
    assert [r["node"] for r in ranks] == [0, 0, 1, 1]
    assert [tuple(r["local_experts"]) for r in ranks] == [(0, 6), (6, 12), (0, 6), (6, 12)]  # 2 groups of 2
    assert main(["run", "--out", str(tmp_path / "ref.json")]) == 0
    ref = {x["id"]: x["next_token"] for x in json.loads((tmp_path / "ref.json").read_text())["results"]}
    got = {x["id"]: x["next_token"] for r in ranks for x in r["results"]}
    assert got == ref and len(got) == 4


def test_a_group_spanning_nodes_is_refused(monkeypatch):
    from dwdp.parallel.group import init_dwdp_groups

    for k, v in dict(RANK="0", WORLD_SIZE="6", LOCAL_WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="must lie within one node"):
        init_dwdp_groups(2)


def test_fault_hook_fires_at_the_named_point_rank_and_hit_only(monkeypatch):
    """DWDP_FAULT, the failure tests' hook: the n-th hit of the point on the named rank, and
    a mistyped value is one clear error rather than a test that silently never fails."""
    from dwdp.parallel import faults

    monkeypatch.setattr(faults, "_hits", faults.Counter())
    monkeypatch.setenv("DWDP_FAULT", "other:0:1:raise, here:1:2:raise")
    faults.fault_point("here", 0)  # hit 1, another rank
    with pytest.raises(RuntimeError, match="injected fault at here #2"):
        faults.fault_point("here", 1)
    faults.fault_point("here", 1)  # hit 3: past it
    monkeypatch.setenv("DWDP_FAULT", "here:1:x")
    with pytest.raises(ValueError, match="write <point>:<rank>"):
        faults.fault_point("here", 1)
    monkeypatch.setenv("DWDP_FAULT", "here:1:9:explode")
    with pytest.raises(ValueError, match="choose from exit, raise, hang"):
        faults.fault_point("here", 1)
