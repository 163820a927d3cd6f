"""Training for the bundled demo model: tokenizer, trainer over the engine's own Qwen3 class, HF export."""
