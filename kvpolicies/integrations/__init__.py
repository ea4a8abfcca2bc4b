"""The outside world the engine plugs into: loading models (transformers, GGUF, the embedded model) and
lm-evaluation-harness."""
