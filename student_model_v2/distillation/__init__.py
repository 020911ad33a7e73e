"""What the student is and how it samples: LoRA adapters, batch conditioning, LCM maths, losses, samplers."""
