"""`model.devices.place`: casts only what changes, so diffusers' float32 warning fires only on a real cast."""

from __future__ import annotations

import logging

import torch

from model.devices import place
from model.tiny import build_tiny_vae


def test_place_skips_the_no_op_cast_and_still_casts(caplog) -> None:
    vae = build_tiny_vae()
    with caplog.at_level(logging.WARNING):
        assert place(vae, "cpu", torch.float32) is vae
    assert "kept in float32" not in caplog.text  # vae.to(dtype=float32) would have printed it
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    place(vae, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    place(vae, "cpu")  # no dtype: left as it is
    assert next(vae.parameters()).dtype == torch.bfloat16
