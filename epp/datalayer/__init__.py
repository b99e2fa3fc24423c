"""The data layer: what epp learns from the model servers themselves (scraped /metrics, per-engine names)."""
