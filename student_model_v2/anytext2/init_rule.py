"""Deterministic weight initialisation shared with the golden reference data.

No weights ship with the golden cases: both the original AnyText2 code and this package rebuild the
model from its YAML and overwrite every floating tensor with values drawn from a CPU generator seeded
by the CRC32 of the tensor's state-dict key. Equal key names therefore give equal values in every
implementation, which is what makes a bit-for-bit weight comparison possible.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn


def init_value(name: str, shape: Sequence[int]) -> torch.Tensor:
    """Return the float32 CPU tensor the rule assigns to state-dict key ``name``."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    shape = tuple(int(s) for s in shape)
    if name.endswith("running_var"):
        value = 0.18 + 0.36 * torch.rand(shape, generator=generator)
    elif name.endswith("running_mean"):
        value = 0.1 * torch.randn(shape, generator=generator)
    elif len(shape) >= 2:
        value = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("weight"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
    else:
        value = 0.02 * torch.randn(shape, generator=generator)
    return value.to(torch.float32)


def apply_init_rule(model: nn.Module, prefix: str = "") -> int:
    """Overwrite every floating state-dict entry of ``model`` in place; return how many were set.

    ``prefix`` is prepended to the module's own keys so that a sub-module (say the OCR model alone)
    receives the values it would get inside the full model. Top-level buffers of the full model (the
    diffusion schedule and ``logvar``, keys without a dot) keep their computed values.
    """
    state = model.state_dict()
    count = 0
    with torch.no_grad():
        for key in sorted(state):
            tensor = state[key]
            full_name = prefix + key
            if not torch.is_floating_point(tensor) or "." not in full_name:
                continue
            tensor.copy_(init_value(full_name, tensor.shape))
            count += 1
    return count
