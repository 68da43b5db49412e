"""Starting groups: several at once never collide on a port; failures reach the user once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
