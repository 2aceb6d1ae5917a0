"""The small vision-language model (SVLM) side of Tempo: inputs, prompts, tiny models, compressor.

Submodules: ``vision_inputs`` (frames → ``pixel_values_videos``/``video_grid_thw``), ``prompt``
(token ids of the segment prompt), ``tokenizer_build`` and ``tiny`` (offline tiny models),
``compressor`` (the query-aware compressor). Import the submodule you need; this package
imports nothing heavy by itself.
"""
