"""A failed group leaves no shared-memory segment of its run behind: a rank that raises
while its segment is still named, an interrupted launcher, a launcher killed outright.

Each case runs ``dwdp run -N 2`` in a subprocess and makes rank 1 fail inside the
window where its segment has a name (``DWDP_FAULT=shm-created:1:<action>``: a hook at that
point, not a timing race). Segment names carry the launcher's pid, so the test looks for
its own run's only (other runs may share the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dwdp.parallel.transport import run_segments

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /dev/shm: Linux")


def _launch(action: str, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "DWDP_FAULT": f"shm-created:1:1:{action}"}
    return subprocess.Popen([sys.executable, "-m", "dwdp.cli", "run", "-N", "2", "--num-layers", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_rank_that_raises_while_its_segment_is_named_leaves_none(tmp_path):
    """Rank 1 raises with its segment created and not yet mapped by its peer (rank 0 waits
    for it at the barrier, its own segment named too): one clean error, exit code 1, and
    none of the run's segments left."""
    proc = _launch("raise", tmp_path)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "injected fault at shm-created" in err and "Traceback" not in err.split("the group failed", 1)[-1]
    assert run_segments(proc.pid) == []


@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_an_interrupted_or_killed_launcher_leaves_no_segment_and_no_rank(tmp_path, how):
    """Rank 1 hangs with its segment named (rank 0's is named too: it waits for rank 1);
    then the launcher gets Ctrl-C (it kills its ranks and removes the run's segments) or
    SIGKILL (no clean-up of its own: each rank notices its launcher is gone, removes the
    segments it created and exits)."""
    proc = _launch("hang", tmp_path)
    ranks: list[int] = []
    try:
        _wait(lambda: len(run_segments(proc.pid)) == 2 or proc.poll() is not None, "both ranks' segments")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        ranks = _children(proc.pid)
        os.kill(proc.pid, signal.SIGINT if how == "interrupt" else signal.SIGKILL)
        proc.wait(timeout=60)
        _wait(lambda: not any(_alive(p) for p in ranks), "every rank process to end", 60)
        _wait(lambda: run_segments(proc.pid) == [], "the run's segments to be removed", 10)
    finally:
        proc.kill()
        for p in ranks:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
