"""``dwdp plan``: predict DWDP vs expert parallelism from model shapes, a hardware
profile and a workload, without a GPU; ``dwdp calibrate`` measures a profile."""
