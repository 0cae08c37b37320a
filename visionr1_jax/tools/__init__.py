"""Command-line tools around a training run: `export` (a run checkpoint as a Hugging Face
checkpoint directory)."""
