"""Pure, Beam-free operations of the Tempo pipeline (video, SVLM, cache, allocation, shards)."""

__version__ = "0.1.0"
