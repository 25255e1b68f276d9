"""Moving models between devices and dtypes without diffusers' false alarms.

diffusers' `ModelMixin.to` warns about "modules that should be kept in float32" on every call that names a dtype,
even when the model is already in it and the list is empty; a user then sees four such lines per run. `place`
moves to the device and casts only when the dtype really changes, so the warning means something when it shows.
"""

from __future__ import annotations

import torch


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module` on `device`, cast to `dtype` only where one of its floating-point tensors has another dtype."""
    module.to(device)
    if dtype is not None and any(
        t.is_floating_point() and t.dtype != dtype for t in (*module.parameters(), *module.buffers())
    ):
        module.to(dtype=dtype)
    return module
