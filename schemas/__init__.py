"""Versioned formats: corpus manifest, cache layout, shard samples, run results."""
