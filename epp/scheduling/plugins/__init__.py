"""Built-in plugins, one per file; `epp.scheduling.registry.BUILT_IN` lists them."""
