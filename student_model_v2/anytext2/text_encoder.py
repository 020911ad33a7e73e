"""CLIP text encoder with AnyText2's glyph-token substitution (``cond_stage_model``).

AnyText2 encodes two captions separately: the image caption (UNet context, split into 75-token chunks,
never truncated) and the text caption (WriteNet context, 77 tokens) whose ``*`` tokens are replaced
by per-line glyph embeddings. The replacement happens on the token embeddings, before the position
embeddings are added, so it cannot be done with a plain ``CLIPTextModel`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PLACEHOLDER = "*"
CHUNK_TOKENS = 75
CONTEXT_TOKENS = CHUNK_TOKENS + 2


class PlaceholderMismatch(ValueError):
    """A caption holds more ``*`` placeholders than its sample has text lines."""


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    folder = Path(folder)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileNotFoundError(f"CLIP tokenizer files (vocab.json, merges.txt) not found in {folder}")
    return CLIPTokenizer.from_pretrained(str(folder))


def split_chunks(input_ids: torch.Tensor, chunk: int = CHUNK_TOKENS) -> list[torch.Tensor]:
    """Cut ``[B, L]`` ids (BOS ... EOS, padded with EOS) into ``[B, chunk+2]`` windows.

    Each window is BOS + up to ``chunk`` content tokens + EOS; the last window is filled with the
    row's end id. An empty caption (``L == 2``) gives one window ``[BOS, EOS x 76]``.
    """
    length = input_ids.shape[1]
    start, end = input_ids[:, :1], input_ids[:, -1:]
    content = input_ids[:, 1:-1]
    if length == 2:
        return [torch.cat([start] + [end] * (chunk + 1), dim=1)]
    windows = []
    for offset in range(0, length - 2, chunk):
        group = content[:, offset : offset + chunk]
        pad = [end.expand(-1, chunk - group.shape[1])] if group.shape[1] < chunk else []
        windows.append(torch.cat([start, group, *pad, end], dim=1))
    return windows


class _TextTower(nn.Module):
    """Holds ``text_model`` so state-dict keys read ``transformer.text_model.*`` as in the checkpoint."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextModel(config)


class TextEncoder(nn.Module):
    """Tokeniser + CLIP text transformer with ``*`` substitution."""

    def __init__(self, text_config: dict[str, Any], tokenizer_dir: str | Path) -> None:
        super().__init__()
        config = CLIPTextConfig(**text_config)
        config._attn_implementation = "sdpa"
        self.transformer = _TextTower(config)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        ids = self.tokenizer(PLACEHOLDER)["input_ids"]
        if len(ids) != 3:
            raise ValueError(f"placeholder '{PLACEHOLDER}' must be a single CLIP token, got ids {ids}")
        self.placeholder_id = int(ids[1])

    def tokenize_image_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Ids padded to the longest caption, no truncation (long captions become several chunks)."""
        out = self.tokenizer(list(captions), truncation=False, padding="longest", return_tensors="pt")
        return out["input_ids"]

    def tokenize_text_captions(self, captions: Sequence[str]) -> torch.Tensor:
        out = self.tokenizer(list(captions), truncation=True, max_length=CONTEXT_TOKENS, padding="max_length", return_tensors="pt")
        return out["input_ids"]

    def _substitute(self, ids: torch.Tensor, embeds: torch.Tensor, lines: Sequence[torch.Tensor] | None, used: list[int]) -> torch.Tensor:
        """Replace placeholder token embeddings by the next unused line embeddings of each row."""
        hits = ids == self.placeholder_id
        if not bool(hits.any()):
            return embeds
        embeds = embeds.clone()
        for row in range(ids.shape[0]):
            count = int(hits[row].sum())
            if count == 0:
                continue
            available = 0 if lines is None else lines[row].shape[0] - used[row]
            if count > available:
                raise PlaceholderMismatch(
                    f"sample {row}: caption holds more '{PLACEHOLDER}' placeholders than text lines "
                    f"({used[row] + count} needed, {used[row] + max(available, 0)} available)"
                )
            embeds[row, hits[row]] = lines[row][used[row] : used[row] + count].to(embeds.dtype)
            used[row] += count
        return embeds

    def _window_embeddings(self, ids: torch.Tensor, lines: Sequence[torch.Tensor] | None, used: list[int]) -> torch.Tensor:
        """Token embeddings of one ``[B, 77]`` window with its placeholders substituted."""
        embedding = self.transformer.text_model.embeddings.token_embedding
        ids = ids.to(embedding.weight.device)
        return self._substitute(ids, embedding(ids), lines, used)

    def _transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """The causal CLIP transformer over ``[N, 77, D]`` token embeddings (rows are independent)."""
        clip = self.transformer.text_model
        hidden = clip.embeddings(inputs_embeds=tokens)
        length = tokens.shape[1]
        causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device,
                            dtype=hidden.dtype).triu(1)
        hidden = clip.encoder(inputs_embeds=hidden, attention_mask=causal[None, None].expand(tokens.shape[0], 1, -1, -1))
        return clip.final_layer_norm(hidden.last_hidden_state)

    def encode(
        self,
        image_captions: Sequence[str],
        text_captions: Sequence[str],
        line_embeddings: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (UNet context ``[B, 77k, D]``, WriteNet context ``[B, 77, D]``).

        ``line_embeddings[i]`` is ``[n_lines_i, D]``. Placeholders consume lines in caption order; the
        count carries across image-caption chunks and restarts at line 0 for the text caption. All
        windows of both captions go through the transformer as one batch: at inference the batch is a
        single request, so one call instead of one per window saves whole passes of kernel launches.
        """
        used = [0] * len(image_captions)
        windows = [self._window_embeddings(w, line_embeddings, used)
                   for w in split_chunks(self.tokenize_image_captions(image_captions))]
        used = [0] * len(text_captions)
        windows.append(self._window_embeddings(self.tokenize_text_captions(text_captions), line_embeddings, used))
        contexts = self._transform(torch.cat(windows)).split([w.shape[0] for w in windows])
        return torch.cat(contexts[:-1], dim=1), contexts[-1]
