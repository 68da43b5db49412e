"""Strategy configs: checked where they are made (one line naming the flag), one flag
vocabulary across subcommands, the CLI's flag groups and bench JSON built from the
dataclasses, the descriptions and the runtime registry in step."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dwdp.bench.worker import BenchSpec
from dwdp.cli import build_parser, main
from dwdp.strategy.registry import STRATEGIES as DESCRIPTIONS
from dwdp.strategy.spec import (EXPERT_DTYPES, NAMES, DEPConfig, DWDPConfig, RankSpec, expert_format, flat_options,
                                options_from)


@pytest.mark.parametrize("make, flag", [
    (lambda: DWDPConfig(local_experts=0), "--local-experts"),
    (lambda: DWDPConfig(local_experts="most"), "--local-experts"),
    (lambda: DWDPConfig(slice_mb=0), "--slice-mb"),
    (lambda: DWDPConfig(copy_streams=0), "--copy-streams"),
    (lambda: DEPConfig(wire="fp16"), "--dep-wire"),
    (lambda: RankSpec("tiny-qwen3-moe", strategy="tp"), "strategy 'tp'"),
    (lambda: RankSpec("tiny-qwen3-moe", expert_dtype="int4"), "--expert-dtype"),
    (lambda: RankSpec("tiny-qwen3-moe", expert_dtype="fp4"), "--expert-dtype fp4"),
    (lambda: RankSpec("tiny-qwen3-moe", max_num_tokens=0), "--max-num-tokens"),
    (lambda: BenchSpec(expert_dtype="fp4"), "--expert-dtype fp4"),
])
def test_bad_options_fail_where_made(make, flag):
    with pytest.raises(ValueError) as e:
        make()
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_configs_round_trip_through_flags_and_json():
    dw, dep = DWDPConfig(local_experts="auto", slice_mb=4.0, copy_streams=2), DEPConfig(wire="native")
    flat = {**flat_options(dw), **flat_options(dep)}
    assert flat == {"local_experts": "auto", "slice_mb": 4.0, "copy_streams": 2, "dep_wire": "native"}
    assert options_from(DWDPConfig, flat) == dw and options_from(DEPConfig, flat) == dep
    assert options_from(DWDPConfig, {}) == DWDPConfig()  # keys absent: the defaults
    # Bench JSON keeps the flat keys older files and `dwdp plan --validate` read.
    d = BenchSpec(dwdp=dw, dep=dep).to_dict()
    assert {k: d[k] for k in flat} == flat and "dwdp" not in d and "dep" not in d


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(sub: argparse.ArgumentParser, flag: str):
    return next((a for a in sub._actions if flag in a.option_strings), None)


def test_one_vocabulary_per_flag_across_subcommands():
    subs = _subparsers(build_parser())
    with_dtype = {name for name, sub in subs.items() if _option(sub, "--expert-dtype")}
    assert with_dtype == {"run", "info", "bench", "plan", "serve"}
    for name in with_dtype:
        assert tuple(_option(subs[name], "--expert-dtype").choices) == EXPERT_DTYPES, name
    # The strategy flags come from the config dataclasses: same type and choices everywhere.
    for cls in (DWDPConfig, DEPConfig):
        for f in dataclasses.fields(cls):
            flag = f.metadata["flags"][0]
            for name in ("run", "bench"):
                a = _option(subs[name], flag)
                assert a is not None and a.type is f.metadata["type"] and a.choices == f.metadata["choices"], \
                    (name, flag)
    assert _option(subs["serve"], "--local-experts").type is _option(subs["run"], "--local-experts").type
    with pytest.raises(SystemExit):  # no GPU to size "auto" on
        build_parser().parse_args(["plan", "-L", "auto"])
    assert build_parser().parse_args(["info", "-L", "48"]).local_experts == 48
    # One name for output files.
    assert not any(_option(sub, "--json") for sub in subs.values())
    assert all(_option(subs[n], "--out") for n in ("run", "bench", "plan", "calibrate", "loadtest"))


def test_the_cli_builds_configs_from_its_flags():
    args = build_parser().parse_args(["bench", "-L", "auto", "--slice-mb", "2", "--copy-streams", "3",
                                      "--dep-wire", "fp8"])
    assert options_from(DWDPConfig, args) == DWDPConfig("auto", 2.0, 3)
    assert options_from(DEPConfig, args) == DEPConfig("fp8")


def test_subcommands_refuse_what_they_cannot_do(capsys):
    assert main(["run", "--expert-dtype", "fp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dwdp run: error: --expert-dtype fp4") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["run", "--dep-wire", "fp16"])  # argparse: not a choice
    assert "--dep-wire" in capsys.readouterr().err


def test_expert_format_as_info_and_plan_price_it():
    assert expert_format("same", True, "fp32") == "fp32"
    assert expert_format("auto", False, "bf16") == "bf16" and expert_format("auto", True, "bf16") == "fp8"
    assert expert_format("fp4", False, "bf16") == "fp4" and expert_format("bf16", True, "fp32") == "bf16"


def test_runtime_strategies_extend_their_descriptions():
    from dwdp.parallel.strategies import STRATEGIES

    assert tuple(DESCRIPTIONS) == tuple(STRATEGIES) == NAMES
    for name, s in STRATEGIES.items():
        assert isinstance(s, type(DESCRIPTIONS[name])), name
