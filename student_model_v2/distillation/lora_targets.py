"""The names of the LoRA target sets, apart from ``lora.py`` so that argument parsers can offer them
without importing peft (and transformers with it): ``--help`` of the training and bench scripts stays fast.
The module lists behind each name live in ``lora.py``."""

LORA_TARGET_SETS: tuple[str, ...] = ("official", "attention")
DEFAULT_LORA_TARGETS = "official"
