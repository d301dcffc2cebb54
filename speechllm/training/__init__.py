"""Adapter training: data order, checkpoints, the feature cache and the loop."""
