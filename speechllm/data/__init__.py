"""Data formats shared by the stages (JSONL manifests, metadata, targets)."""
