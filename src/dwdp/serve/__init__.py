"""``dwdp serve``: an OpenAI-compatible completions server over the prefill and decode
engines, with Prometheus metrics; ``dwdp loadtest``: a bounded loopback load generator."""
