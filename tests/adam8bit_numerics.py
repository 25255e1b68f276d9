"""The trainers' optimizer with and without --use_8bit_adam on one small regression, run as a script in a process of
its own (tests/test_training_recipes.py): bitsandbytes is imported there only, from the folder `make test` installs
it into, so no other test's peft import loads it. Prints the comparison as one JSON line."""

from __future__ import annotations

import json
from argparse import Namespace

import torch

from training.optimization import make_optimizer

SETTINGS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8}


def compare(steps: int = 20) -> dict[str, object]:
    """Both optimizers from the same start on the same data: how far AdamW moved the weights, how far the 8-bit
    result is from AdamW's, and the dtype of each one's first-moment state."""
    torch.manual_seed(0)
    start, inputs = torch.randn(64, 128), torch.randn(32, 128)
    targets = inputs @ torch.randn(128, 64)
    results, states = {}, {}
    for eight_bit in (False, True):
        weight = torch.nn.Parameter(start.clone())
        optimizer = make_optimizer([weight], Namespace(use_8bit_adam=eight_bit, **SETTINGS), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(inputs @ weight.T, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results[eight_bit], states[eight_bit] = weight.detach(), optimizer.state[weight]
    return {
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "adamw_moved": float((results[False] - start).abs().mean()),
        "difference": float((results[True] - results[False]).abs().mean()),
        "state_dtypes": [str(states[False]["exp_avg"].dtype), str(states[True]["state1"].dtype)],
    }


if __name__ == "__main__":
    print(json.dumps(compare()))
