"""Readers for the label sources: TextGrid alignments, SPEAKERS.TXT, pitch."""
