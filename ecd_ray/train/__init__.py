"""Preference-optimisation training on Ray Train: losses and trainer pieces."""
