"""Where the pool's endpoints come from: a static list (files and Kubernetes follow)."""
