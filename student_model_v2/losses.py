"""Focal frequency and masked-gradient losses, under the name the original toolkit used.

The implementation lives in :mod:`student_model_v2.distillation.losses`; this module keeps
``from student_model_v2.losses import FocalFrequencyLoss`` working.
"""

from student_model_v2.distillation.losses import (
    FocalFrequencyLoss,
    MaskedGradientLoss,
    MaskSource,
    Reduction,
    text_mask_from_batch,
)

__all__ = [
    "FocalFrequencyLoss", "MaskedGradientLoss", "text_mask_from_batch", "MaskSource", "Reduction",
]
