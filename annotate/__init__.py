"""annotate: audio -> measurements -> words (the annotation stage)."""
