"""Strategy comparison: ``dwdp bench`` (run) and ``dwdp report`` (plots)."""
