"""Where the pool comes from: a static list, manifest files, or the Kubernetes API; one snapshot path for all."""
