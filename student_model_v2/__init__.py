"""AnyText2 -> 4-step LCM-LoRA distillation toolkit."""
