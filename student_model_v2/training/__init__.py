"""Shared training machinery for every distillation version (LoRA, trainer loop, checkpoints)."""
