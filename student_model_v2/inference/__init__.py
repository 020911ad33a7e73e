"""Inference layer: user inputs, conditioning from prompts and positions, pipeline, caches, model swaps."""
