"""The command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dwdp.cli import main
from dwdp.engine import PrefillEngine, Request
from dwdp.models import build_model, init_random
from dwdp.presets import resolve_model


def test_dwdp_run_default_is_a_tiny_cpu_prefill(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tokens"] == 16 + 48 + 7 + 100 and data["tokens_per_s"] > 0
    # next tokens equal a direct forward of the same prompts, one at a time
    cfg, _ = resolve_model("tiny-qwen3-moe")
    model = init_random(build_model(cfg), 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (16, 48, 7, 100)]
    for r in data["results"]:
        res = PrefillEngine(model).run([Request(0, prompts[r["id"]])])[0]
        assert res.next_token == r["next_token"]


def test_scheduler_chunks_long_prompts_under_the_token_budget():
    cfg, _ = resolve_model("tiny-deepseek-v3")
    model = init_random(build_model(cfg), 3)
    g = torch.Generator().manual_seed(0)
    reqs = [Request(i, torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()) for i, n in enumerate((70, 5, 33))]
    whole = {r.id: r for r in PrefillEngine(model, max_num_tokens=4096).run(reqs)}
    eng = PrefillEngine(model, max_num_tokens=16)
    chunked = {r.id: r for r in eng.run(reqs)}
    assert all(s.num_tokens <= 16 for s in eng.steps) and len(eng.steps) == -(-108 // 16)
    for i in whole:
        torch.testing.assert_close(chunked[i].logits, whole[i].logits, rtol=1e-5, atol=1e-5)
        for (a1, b1), (a2, b2) in zip(chunked[i].kv, whole[i].kv):
            torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_the_model_allows_is_refused():
    cfg, _ = resolve_model("tiny-qwen3-moe")
    model = init_random(build_model(cfg), 0)
    with pytest.raises(ValueError, match="longer than the model allows"):
        PrefillEngine(model).run([Request(7, [1] * (cfg.max_position_embeddings + 1))])
    with pytest.raises(ValueError, match="token ids"):
        PrefillEngine(model).run([Request(8, [cfg.vocab_size])])


def test_info_shows_experts_dominate_and_dwdp_memory(capsys):
    assert main(["info", "--model", "deepseek-v3", "-N", "4"]) == 0
    text = capsys.readouterr().out
    assert "671,026,404,352" in text and "97.4%" in text and "two prefetch slots" in text
    # (512 latent + 64 rope) x 61 layers x 2 bytes = 70,272 B per token
    assert "decode KV cache: 68.6 KiB per token" in text


def test_bad_input_gives_a_clear_error(capsys):
    assert main(["run", "--model", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["info", "-N", "5", "-L", "3"]) == 2
    assert "Valid L: 4, 8" in capsys.readouterr().err


def test_dwdp_run_spawns_a_group_and_matches_single_process():
    single = subprocess.run([sys.executable, "-m", "dwdp.cli", "run", "--lengths", "9,30,4"],
                            capture_output=True, text=True, check=True).stdout
    group = subprocess.run([sys.executable, "-m", "dwdp.cli", "run", "-N", "3", "--lengths", "9,30,4"],
                           capture_output=True, text=True, check=True, timeout=300).stdout
    assert "E=12 N=3 L=4 P=4" in group
    import re
    single_next = [int(x) for x in re.findall(r"│\s+\d+ │\s+\d+ │\s+(\d+) │", single)]
    group_next = [int(x) for x in re.findall(r"-> (\d+)", group)]
    assert single_next and single_next == group_next


def test_bench_then_report(tmp_path, capsys):
    import json

    from dwdp.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--num-requests", "3", "--isl", "40", "--cv", "0,0.3", "--dist", "normal",
                 "--strategies", "dep,dwdp", "--max-num-tokens", "32", "--balance-tail", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "torch" in data["machine"] and len(data["runs"]) == 2
    for run in data["runs"]:  # --balance-tail: dwdp ranks end on equal steps, lockstep dep keeps MNT steps
        assert run["spec"]["balance_tail"] is True
        for rank in run["results"]["dwdp"]["ranks"]:
            real = [t for t in rank["step_tokens"] if t]
            total = sum(real)
            assert len(real) == -(-total // 32) and max(real) - min(real) <= 1, real
        for rank in run["results"]["dep"]["ranks"]:
            real = [t for t in rank["step_tokens"] if t]
            assert all(t == 32 for t in real[:-1]), real
    assert [r["spec"]["workload"]["cv"] for r in data["runs"]] == [0.0, 0.3]
    for run in data["runs"]:
        assert set(run["results"]) == {"dep", "dwdp"}
        assert run["results"]["dep"]["tokens"] == run["results"]["dwdp"]["tokens"]
    assert main(["report", str(out), "-o", str(tmp_path / "png")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["breakdown.png", "throughput.png", "ttft.png"]
    assert all((tmp_path / "png" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    # What the plots draw: tok/s/GPU against the swept CV (not the input ratio), one series
    # per strategy, the file's own numbers; titles name the device (CPU here).
    from dwdp.bench.report import describe_setting, device_name, throughput_series, time_parts
    from dwdp.bench.schema import load_runs

    runs = load_runs([str(out)])
    x, series = throughput_series(runs)
    assert x[0] == "cv" and sorted(series) == [("dep", ()), ("dwdp", ())]
    for (strat, _), by_x in series.items():
        assert by_x == {r["spec"]["workload"]["cv"]: [r["results"][strat]["tps_per_gpu"]] for r in data["runs"]}
    assert device_name(runs[0]) == "CPU" and "MNT 32" in describe_setting(runs[0])
    # A rank's parts in breakdown.png: dep's transfer and waiting are its time in collectives,
    # dwdp's waiting is its exposed prefetch wait (its pulls overlap the compute, no part of
    # its time); the parts add up to the run's makespan.
    for i, run in enumerate(data["runs"]):
        for strat, res in run["results"].items():
            for rk, parsed in zip(res["ranks"], runs[i].results[strat].ranks):
                parts = time_parts(parsed)
                assert sum(parts.values()) == pytest.approx(res["makespan_s"], rel=1e-6)
                assert min(parts.values()) >= 0
                if strat == "dep":
                    assert parts["transfer"] + parts["wait"] == pytest.approx(rk["collective_s"], rel=1e-6)
                    assert parts["transfer"] > 0
                else:
                    assert parts["transfer"] == 0 and parts["wait"] == rk["exposed_wait_s"]
    # The readers of the same file: report --markdown (one row per MNT, CV and strategy,
    # ratios to dep) and plan --validate (a prediction beside each measured strategy).
    capsys.readouterr()
    assert main(["report", "--markdown", str(out)]) == 0
    md = capsys.readouterr().out
    assert "x CPU" in md
    no_git = json.loads(out.read_text())
    no_git["machine"]["commit"] = None  # run outside a git checkout
    (tmp_path / "nogit.json").write_text(json.dumps(no_git))
    assert main(["report", "--markdown", str(tmp_path / "nogit.json")]) == 0
    assert main(["report", "--reps", str(tmp_path / "nogit.json")]) == 0
    assert "commit" not in capsys.readouterr().out
    rows = [line for line in md.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 4 and {r.split(" | ")[2] for r in rows} == {"dep", "dwdp"}
    assert all(r.split(" | ")[4] == "1.00" for r in rows if r.split(" | ")[2] == "dep")
    assert main(["plan", "--validate", str(out), "--hardware", "h200"]) == 0
    table = capsys.readouterr().out
    assert table.count("tiny-qwen3-moe") == 9 and "step time within" in table  # steps, components, fit used
    assert "tiny-qwen3-moe: profile defaults" in table and "  dep: " in table and "  dwdp: " in table
    assert "dep expert load, busiest rank / mean per layer (measured / predicted): " in table
    # The same file twice reads as two repetitions of each setting: one row per strategy.
    assert main(["report", "--reps", str(out), str(out)]) == 0
    reps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-qwen3-moe")]
    assert len(reps) == 4 and all(" | 2 | " in r for r in reps)
    # dep's all-to-all rate beside the file's NCCL ceiling, measured once per process (here
    # planted in the first run only): every dep row of that file shows it; dwdp has none.
    planted = json.loads(out.read_text())
    for rk in planted["runs"][0]["results"]["dep"]["ranks"]:
        rk["a2a_ceiling_gbps"] = 300.0
    (tmp_path / "ceil.json").write_text(json.dumps(planted))
    assert main(["report", "--reps", str(tmp_path / "ceil.json")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-qwen3-moe")]
    assert [r[-1].strip(" |") for r in rows if r[6] == "dwdp"] == ["-", "-"]
    assert all(r[-1].strip(" |").endswith("(300)") and float(r[-1].split()[0]) > 0 for r in rows if r[6] == "dep")
    (tmp_path / "bad.json").write_text('{"runs": [{"spec": {"model": "x"}, "results": {}}]}')
    assert main(["report", "--markdown", str(tmp_path / "bad.json")]) == 2
    assert "missing field 'world_size'" in capsys.readouterr().err


def test_bench_rejects_bad_input(capsys):
    from dwdp.cli import main

    assert main(["bench", "--strategies", "dep,tp"]) == 2
    assert "unknown strategy 'tp'" in capsys.readouterr().err
    assert main(["bench", "--isl", "100000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["bench", "--world-size", "3", "--group-size", "2"]) == 2
    assert "not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--short-steps", "ship"], ["run", "--ship-max-tokens", "64"],
                                  ["serve", "--pull-pacing", "jit"], ["bench", "--dep-overlap"]])
def test_flags_of_removed_experiments_say_so(argv):
    """A removed experiment's flag fails before anything runs, naming what happened."""
    from dwdp.cli import main

    with pytest.raises(SystemExit, match=f"{argv[1]} was removed: .*measured"):
        main(argv)


def test_bench_repeat_runs_each_setting_again_in_the_same_processes(tmp_path, capsys):
    """--repeat K: K runs of every setting, rep-major, each naming its repetition; the same
    requests each time; report --reps reads them as K repetitions of one setting."""
    import json

    from dwdp.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--num-requests", "3", "--isl", "40", "--cv", "0,0.3", "--dist", "normal",
                 "--strategies", "dp,dwdp", "--max-num-tokens", "32", "--repeat", "2", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["spec"]["repeat"], r["spec"]["workload"]["cv"]) for r in runs] == [(1, 0.0), (1, 0.3), (2, 0.0), (2, 0.3)]
    for a, b in ((runs[0], runs[2]), (runs[1], runs[3])):
        for strat in ("dp", "dwdp"):
            ra, rb = a["results"][strat]["ranks"], b["results"][strat]["ranks"]
            assert [x["step_tokens"] for x in ra] == [x["step_tokens"] for x in rb]  # same workload again
    capsys.readouterr()
    assert main(["report", "--reps", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-qwen3-moe")]
    assert len(rows) == 4 and all(" | 2 | " in r for r in rows)  # (2 CVs x 2 strategies), 2 reps each
    assert main(["bench", "--repeat", "0"]) == 2
    assert "--repeat 0" in capsys.readouterr().err


def test_bench_keeps_the_strategies_that_finished_when_a_later_one_fails(tmp_path, monkeypatch, capsys):
    import json

    import dwdp.parallel.launch as launch
    from dwdp.cli import main

    real = launch.spawn_local

    def failing_dwdp(fn, world, args, **kw):
        if args[1] == "dwdp":
            raise launch.SpawnError({0: "planted failure"})
        return real(fn, world, args, **kw)

    monkeypatch.setattr(launch, "spawn_local", failing_dwdp)
    out = tmp_path / "p.json"
    assert main(["bench", "--num-requests", "2", "--isl", "24", "--strategies", "dp,dwdp",
                 "--max-num-tokens", "32", "--out", str(out)]) == 1
    runs = json.loads(out.read_text())["runs"]
    assert [sorted(r["results"]) for r in runs] == [["dp"]] and runs[0]["results"]["dp"]["tokens"] > 0
    assert "holds the strategies that finished" in capsys.readouterr().out


def test_isl_sweep_bench_and_plot_with_the_planner_beside_it(tmp_path):
    """--isl as a list runs one setting per ISL; report draws isl_sweep.png with dwdp plan's
    prediction for each measured point when given a hardware profile."""
    import json

    from dwdp.bench.report import isl_sweep_series
    from dwdp.bench.schema import load_runs
    from dwdp.cli import main
    from dwdp.planner.hardware import resolve_profile

    out = tmp_path / "isl.json"
    assert main(["bench", "--num-requests", "4", "--isl", "24,48", "--dist", "fixed", "--strategies", "dp,dwdp",
                 "--max-num-tokens", "32,64", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["spec"]["max_num_tokens"], r["spec"]["workload"]["isl"], r["spec"]["workload"]["num_requests"])
            for r in runs] == [(32, 24, 8), (32, 48, 4), (64, 24, 8), (64, 48, 4)]  # same tokens per setting
    assert main(["report", str(out), "-o", str(tmp_path / "png"), "--hardware", "h200"]) == 0
    assert (tmp_path / "png" / "isl_sweep.png").read_bytes()[:4] == b"\x89PNG"
    series = isl_sweep_series(load_runs([str(out)]), resolve_profile("h200"))
    assert sorted(series) == [("dp", 32, 0.0), ("dp", 64, 0.0), ("dwdp", 32, 0.0), ("dwdp", 64, 0.0)]
    for (strat, mnt, _), d in series.items():
        assert d["isl"] == [24, 48]
        want = [r["results"][strat]["tps_per_gpu"] for r in runs if r["spec"]["max_num_tokens"] == mnt]
        assert d["measured"] == want
        assert all(v is not None and v > 0 for v in d["predicted"])
    # Without a profile: the measured curves only. The same file twice reads as repetitions:
    # one point per ISL (the median), not a zig-zag.
    twice = isl_sweep_series(load_runs([str(out), str(out)]))
    assert all(v is None for d in twice.values() for v in d["predicted"])
    assert all(d["isl"] == [24, 48] for d in twice.values())
    assert main(["bench", "--isl", "24.5", "--out", str(tmp_path / "x.json")]) == 2
