"""Evaluation layer: benchmark prompts, generation, OCR metrics, reports, student-teacher latent gaps."""
