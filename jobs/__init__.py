"""Entrypoints for `ray job submit` (each file's docstring shows its commands)."""
