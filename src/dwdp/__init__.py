"""dwdp: an MoE prefill engine built around Distributed Weight Data Parallelism."""

__version__ = "0.1.0"
