"""Turn a collated data batch into the teacher's inputs, once per batch.

Everything here is frozen computation shared by teacher and student: the VAE latents of the image and
the masked image, the line embeddings (OCR, position, style, colour) and both CLIP captions for cond
and AnyText2's own uncond (negative prompt / empty text caption, same glyphs and positions). Two
switches exist only so the v2 baseline can be measured against v2_2's speed-ups with identical
numbers: ``merged_vae`` (one VAE call for both images) and ``uncond_cache`` (reuse the uncond captions).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..anytext2.model import AnyText2Model, Conditions, TextInfo
from ..anytext2.text_encoder import PLACEHOLDER
from ..anytext2.vae import DiagonalGaussian


@dataclass
class EncodedBatch:
    """Latents and conditions of one batch; ``uncond`` is None when no CFG is needed.

    ``vae_calls`` holds the rows of each VAE encoder call and ``text_encoder_calls`` the (role, rows) of
    each CLIP caption pass that ran (a cached uncond adds none), for pass counting.
    """

    latents: torch.Tensor
    cond: Conditions
    uncond: Conditions | None
    vae_calls: list[int] = field(default_factory=list)
    text_encoder_calls: list[tuple[str, int]] = field(default_factory=list)


def scrub_placeholders(captions: list[str]) -> list[str]:
    """Training image captions must hold no ``*``: AnyText2's substitution would consume line embeddings."""
    return [caption.replace("*", " ") for caption in captions]


def text_info_from_batch(batch: dict[str, Any], masked_x: torch.Tensor) -> TextInfo:
    n_lines = batch["n_lines"]
    n_lines = n_lines.tolist() if torch.is_tensor(n_lines) else list(n_lines)
    return TextInfo(
        glyphs=list(batch["glyphs"]),
        gly_line=list(batch["gly_line"]),
        positions=list(batch["positions"]),
        colors=list(batch["color"]),
        font_hint=batch["font_hint"],
        masked_x=masked_x,
        n_lines=[int(n) for n in n_lines],
    )


def weights_fingerprint(module: nn.Module) -> tuple:
    """Identity, dtype, device, storage and in-place version of every tensor of ``module``.

    ``load_state_dict`` bumps the versions and ``.to()`` changes dtype/device/storage, so any change of
    the weights changes the fingerprint.
    """
    tensors = itertools.chain(module.parameters(), module.buffers())
    return (id(module),) + tuple((t.dtype, str(t.device), t.data_ptr(), t._version) for t in tensors)


class UncondCaptionCache:
    """Reuses the CLIP contexts of the uncond captions across batches (the original v2_2's uncond cache).

    Only the captions are cached (image caption = negative prompt, text caption = ""): the uncond's line
    embeddings, glyphs, positions, masked image and WriteNet residuals are per batch and never cached.
    The key holds everything the contexts depend on — the negative prompt, the batch size and a
    fingerprint of the text encoder's weights (identity, dtype, device, in-place version) — plus the
    image size: the captions do not depend on it, but a resolution change then costs one CLIP pass and
    an entry can never be served to a batch of another shape. At most ``max_entries`` keys are kept
    (least recently used dropped), e.g. the full batch size and a last partial batch.
    """

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, model: AnyText2Model, negative_prompt: str, batch_size: int,
            image_size: Sequence[int]) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
        """(uncond image context, uncond text context) and whether they were computed now (a miss)."""
        if PLACEHOLDER in negative_prompt:
            raise ValueError(f"negative prompt {negative_prompt!r} holds '{PLACEHOLDER}': its embedding depends on "
                             "the batch's text lines and cannot be cached")
        key = (negative_prompt, int(batch_size), tuple(int(s) for s in image_size),
               weights_fingerprint(model.cond_stage_model))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], False
        with torch.no_grad():
            contexts = model.uncond_caption_contexts(negative_prompt, batch_size)
        self._entries[key] = contexts
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return contexts, True


def encode_latents(model: AnyText2Model, images: Sequence[torch.Tensor], generator: torch.Generator | None = None,
                   merged: bool = True) -> tuple[list[torch.Tensor], list[int]]:
    """Scaled posterior samples of same-shape image batches, in order, and the rows of each VAE call.

    ``merged`` runs one encoder call on all images; otherwise one call per input (the v2 baseline). The
    posterior noise is drawn per input in the same order either way, so both give the same samples for
    the same generator (up to the encoder's batching round-off).
    """
    vae = model.first_stage_model
    pixels = [image.to(model.device, model.dtype) for image in images]
    if merged:
        moments = list(vae.encode_moments(torch.cat(pixels)).split([p.shape[0] for p in pixels]))
        calls = [sum(p.shape[0] for p in pixels)]
    else:
        moments = [vae.encode_moments(p) for p in pixels]
        calls = [p.shape[0] for p in pixels]
    latents = [(model.scale_factor * DiagonalGaussian(m).sample(generator)).float() for m in moments]
    return latents, calls


@torch.no_grad()
def encode_batch(
    model: AnyText2Model,
    batch: dict[str, Any],
    negative_prompt: str | None,
    generator: torch.Generator | None = None,
    merged_vae: bool = True,
    uncond_cache: UncondCaptionCache | None = None,
) -> EncodedBatch:
    """VAE latents of ``img`` and ``masked_img`` (one call unless ``merged_vae`` is False), then the conditions.

    The latents are posterior samples (as AnyText2 trains); ``generator`` makes them reproducible. With
    ``uncond_cache`` the uncond captions come from the cache, unless the negative prompt holds a ``*``
    placeholder (then they depend on the lines and are encoded afresh).
    """
    (latents, masked_x), vae_calls = encode_latents(model, [batch["img"], batch["masked_img"]], generator, merged_vae)
    info = text_info_from_batch(batch, masked_x)
    batch_size = latents.shape[0]
    text_calls = [("cond", batch_size)]
    uncond_contexts = None
    if negative_prompt is not None:
        if uncond_cache is not None and PLACEHOLDER not in negative_prompt:
            uncond_contexts, computed = uncond_cache.get(model, negative_prompt, batch_size, batch["img"].shape[-2:])
        else:
            computed = True
        if computed:
            text_calls.append(("uncond", batch_size))
    cond, uncond = model.encode_conditions(
        info, scrub_placeholders(list(batch["img_caption"])), list(batch["text_caption"]), negative_prompt,
        uncond_contexts,
    )
    return EncodedBatch(latents, cond, uncond, vae_calls, text_calls)
