"""Model-server metrics (scraping, per-engine names) and the EPP's own Prometheus metrics."""
