"""Corpora: LibriSpeech layout, the synthetic demo corpus, and the prepared-corpus artifact."""
