"""The model side: adapters for the wav2vec2 family, editing, pruning and random test models."""
