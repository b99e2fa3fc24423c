"""Built-in plugins, one per file; each registers its GIE type name on import."""
