"""Recordings: written safely, read as bounded streams, replayed."""
