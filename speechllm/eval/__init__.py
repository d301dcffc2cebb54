"""Evaluation: audio tasks, forgetting checks (Speech-IFEval style) and text-only retention."""
