"""What each parallel strategy is, apart from running it: its options, which experts a
rank stores and what that costs in memory, and its cost model for the planner.

Pure (no torch.distributed), so the planner and ``dwdp info`` use it without the
runtime; :mod:`dwdp.parallel.strategies` adds how each strategy is applied to a model.

- :mod:`.spec`: the names, the per-strategy configs, :class:`~.spec.RankSpec`;
- :mod:`.placement` (DWDP) and :mod:`.wire` (DEP): the arithmetic the runtime shares;
- :mod:`.dp`, :mod:`.dep`, :mod:`.dwdp`: one description each;
  :mod:`.registry` the one place that maps a name to its description.
"""
