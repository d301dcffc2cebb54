"""Reading and writing the bytes every stage shares: audio files (`audio`) and resumable,
atomic JSONL (`jsonl`)."""
