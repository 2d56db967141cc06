"""One protection method per file; `protect/registry.py` lists them by name."""
