"""Conditioning work that is the same for every generation request, done once per pipeline.

Generation mode encodes an all -1 "masked image" through the VAE for every request, and the teacher
encodes the same negative prompt for every request. Both results depend only on the image size and
the weights, so they are kept: the VAE moments (not the latent sample, so each request still draws its
own posterior noise from its seeded generator, in AnyText2's order) and the uncond CLIP contexts (the
training trainer's cache). The keys fingerprint the weights, so a base-model swap or a dtype change
recomputes them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..anytext2.model import AnyText2Model
from ..anytext2.vae import DiagonalGaussian
from ..distillation.conditioning import weights_fingerprint

BLANK_PIXEL = -1.0


def is_blank_masked_image(masked_image: torch.Tensor) -> bool:
    """True for generation mode's masked image: every pixel masked to -1."""
    return bool((masked_image == BLANK_PIXEL).all())


class BlankLatentCache:
    """VAE posterior moments of the all -1 image, per image size (least recently used size dropped)."""

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.misses = 0
        self._moments: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def latent(self, model: AnyText2Model, masked_image: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
        """``model.vae_encode(masked_image, generator=generator)`` for a blank image, from cached moments."""
        if not is_blank_masked_image(masked_image):
            raise ValueError("BlankLatentCache only serves all -1 masked images (generation mode)")
        vae = model.first_stage_model
        key = (tuple(masked_image.shape), weights_fingerprint(vae))
        moments = self._moments.get(key)
        if moments is None:
            self.misses += 1
            moments = vae.encode_moments(masked_image.to(model.device, model.dtype))
            self._moments[key] = moments
            while len(self._moments) > self.max_entries:
                self._moments.popitem(last=False)
        else:
            self._moments.move_to_end(key)
        return model.scale_factor * DiagonalGaussian(moments).sample(generator)
