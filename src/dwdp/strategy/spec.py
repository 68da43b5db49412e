"""The strategies' names and what configures a rank: each strategy's own options
(:class:`DWDPConfig`, :class:`DEPConfig`) nested in :class:`RankSpec`, and the plan of
what a rank stores (:class:`RankPlan`).

Options are checked where they are made, so a bad value fails with its flag's name
before any process starts, not deep inside a runtime. Each field declares its flag
(:func:`option`): the CLI builds its flag groups from them, and bench JSON records them
flat under the flags' names; the bench, the serving pools and the tests nest the configs
as they are.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..config import ConfigError
from .placement import Placement
from .wire import WIRES

DP, DEP, DWDP = "dp", "dep", "dwdp"  # the strategies' names; other modules import these
NAMES = (DP, DEP, DWDP)
BASELINE = DEP  # what throughput ratios are reported against: the expert parallelism the field runs

# Routed experts' storage, one vocabulary for every subcommand: auto = as the checkpoint ships
# them, same = the model dtype, bf16, fp8 = e4m3 with 128x128 block scales, fp4 (priced by the
# planner and `dwdp info`; nothing runs it yet). Each consumer refuses, by name, what it cannot do.
EXPERT_DTYPES = ("auto", "same", "bf16", "fp8", "fp4")
RUNNABLE_EXPERT_DTYPES = ("auto", "same", "bf16", "fp8")


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{option} {value!r}: choose from {', '.join(map(str, choices))}")


def check_expert_dtype(value: str, runnable: bool = True) -> None:
    """``runnable``: refuse what only the planner and ``dwdp info`` can price (fp4)."""
    check_choice("--expert-dtype", value, EXPERT_DTYPES)
    if runnable and value not in RUNNABLE_EXPERT_DTYPES:
        raise ConfigError(f"--expert-dtype {value}: no kernel stores or runs {value} experts yet; "
                         f"`dwdp plan` and `dwdp info` price them. Choose from {', '.join(RUNNABLE_EXPERT_DTYPES)}")


def local_count(text: str) -> int | str:
    """``-L``: a number of experts, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of experts or 'auto'") from None


def option(default, *flags: str, help: str, type=None, choices=None):
    """A config field and its command-line flag (the first flag's name, dashes as
    underscores, is also its key in argparse's namespace and in result JSON)."""
    return field(default=default, metadata={"flags": flags, "help": help, "type": type, "choices": choices})


def option_key(f) -> str:
    return f.metadata["flags"][0].lstrip("-").replace("-", "_")


def options_from(cls, values: Any):
    """A config from flat option keys: argparse's namespace or a result JSON's spec (keys
    absent: the defaults)."""
    if not isinstance(values, dict):
        values = vars(values)
    return cls(**{f.name: values[option_key(f)] for f in fields(cls) if values.get(option_key(f)) is not None})


def flat_options(config) -> dict[str, Any]:
    """A config as flat option keys (how bench JSON records it)."""
    return {option_key(f): getattr(config, f.name) for f in fields(config)}


def expert_format(expert_dtype: str, fp8_checkpoint: bool, model_dtype: str) -> str:
    """The storage format ``--expert-dtype`` names, for those that price experts without
    building them (``dwdp info``, ``dwdp plan``): auto = FP8 for an FP8 checkpoint, else the
    model dtype, as :func:`dwdp.models.build.resolve_expert_dtype` stores them."""
    check_expert_dtype(expert_dtype, runnable=False)
    if expert_dtype == "same" or (expert_dtype == "auto" and not fp8_checkpoint):
        return model_dtype
    return "fp8" if expert_dtype == "auto" else expert_dtype


@dataclass(frozen=True)
class DWDPConfig:
    """DWDP's options: how many experts each rank keeps, and how it pulls the rest."""

    local_experts: int | str | None = option(
        None, "--local-experts", "-L", type=local_count,
        help="DWDP: experts each rank keeps per MoE layer (default: the smallest valid L; auto: the largest that "
             "fits the GPU, so fewer are pulled)")
    slice_mb: float | None = option(
        None, "--slice-mb", type=float, help="DWDP: cut pulls into slices of this many MiB, round-robin over peers")
    copy_streams: int = option(
        1, "--copy-streams", type=int, help="DWDP: copy streams per rank (slices go round-robin over them; default 1)")

    def __post_init__(self):
        L = self.local_experts
        if not (L is None or L == "auto" or (isinstance(L, int) and not isinstance(L, bool) and L >= 1)):
            raise ConfigError(f"--local-experts {L!r}: a positive number of experts or auto")
        if self.slice_mb is not None and not self.slice_mb > 0:
            raise ConfigError(f"--slice-mb {self.slice_mb}: must be positive (or left out: whole-block pulls)")
        if not (isinstance(self.copy_streams, int) and self.copy_streams >= 1):
            raise ConfigError(f"--copy-streams {self.copy_streams!r}: at least 1")

    @property
    def slice_bytes(self) -> int | None:
        return int(self.slice_mb * 2**20) if self.slice_mb else None

    def placement(self, num_experts: int, group_size: int) -> Placement:
        """Which experts each rank keeps ("auto" must be resolved first: it needs the device)."""
        if self.local_experts == "auto":
            raise ConfigError("local_experts='auto' is resolved on the rank's device before planning")
        return Placement.create(num_experts, group_size, self.local_experts)


@dataclass(frozen=True)
class DEPConfig:
    """DEP's options."""

    wire: str = option("auto", "--dep-wire", choices=WIRES,
                       help="DEP dispatch rows: auto = FP8 with 1x128 scales when experts are FP8 (default), "
                            "native = the activation dtype, fp8")

    def __post_init__(self):
        check_choice("--dep-wire", self.wire, WIRES)


@dataclass
class RankSpec:
    """Everything a rank needs to build its model; identical on every rank of a group."""

    model: str  # preset name or Hugging Face checkpoint directory
    strategy: str = DWDP
    num_layers: int | None = None  # keep only the first N layers
    dtype: str | None = None  # a key of config.DTYPES; default bf16 on GPU, fp32 on CPU
    device: str = "cpu"  # "cpu" or "cuda" (each rank takes cuda:LOCAL_RANK)
    group_size: int = 1
    expert_dtype: str = "auto"  # see EXPERT_DTYPES
    dense_dtype: str = "auto"  # the projections: as the checkpoint ships them; "same"; "fp8"
    dwdp: DWDPConfig = field(default_factory=DWDPConfig)
    dep: DEPConfig = field(default_factory=DEPConfig)
    seed: int = 0  # random weights (presets)
    max_num_tokens: int = 8192  # the step budget: sizes the memory fit check
    peer_timeout_s: float = 60.0

    def __post_init__(self):
        check_choice("strategy", self.strategy, NAMES)
        check_choice("device", self.device, ("cpu", "cuda"))
        check_expert_dtype(self.expert_dtype)
        if self.group_size < 1:
            raise ConfigError(f"--group-size {self.group_size}: at least 1")
        if self.max_num_tokens < 1:
            raise ConfigError(f"--max-num-tokens {self.max_num_tokens}: at least 1")
        if not self.peer_timeout_s > 0:
            raise ConfigError(f"--peer-timeout {self.peer_timeout_s}: must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RankPlan:
    """What one rank of a strategy stores, decided before anything is allocated."""

    label: str  # e.g. "dwdp (E=128 N=4 L=32 P=32)", used in errors and tables
    expert_shard: tuple[int, int] | None  # (first expert, count) per MoE layer; None: all
    weight_bytes: int  # parameters + DWDP slots + DEP all-to-all buffers: the fit check adds activations
    placement: Placement | None = None
