"""Reading and writing the bytes every stage shares: audio files (`audio`), resumable, atomic
JSONL (`jsonl`), and the paths stages write (`paths`)."""
