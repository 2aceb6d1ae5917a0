"""The LLM stage: projector + Qwen3 causal LM of a Tempo checkpoint, input construction, greedy answers."""

from tempo_ops.llm.model import DEFAULT_MAX_LENGTH, IGNORE_INDEX, Generation, LLMInputs, TempoLLM

__all__ = ["DEFAULT_MAX_LENGTH", "IGNORE_INDEX", "Generation", "LLMInputs", "TempoLLM"]
