"""Thin DVC stage entry points: `python -m stages.<name>` parses params and calls `pipeline`."""
