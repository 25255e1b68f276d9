"""What both trainers share around the trainable weights: the optimizer (plain AdamW, or bitsandbytes' 8-bit AdamW
to fit smaller cards) and an optional exponential moving average of the weights (diffusers' `EMAModel`).

bitsandbytes is an optional extra (``pip install -e ".[bnb]"``): it is imported only when ``--use_8bit_adam`` is
given, and its absence is refused with one line before any model loads (`check_optimizer_available`).

The EMA is a training-state object: accelerate saves it in every checkpoint (``register_for_checkpointing``) and
loads it back on resume, so a resumed run's EMA equals an uninterrupted run's bit for bit. `averaged_weights`
swaps the EMA into the model for validation and for its export, and restores the raw weights after.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.core.errors import UsageError

EMA_FOLDER = "ema"  # the EMA export, inside the raw export's folder


def add_adamw_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, weight_decay: float) -> None:
    """AdamW's hyperparameters, which `make_optimizer` reads; the default weight decay is the trainer's own."""
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    parser.add_argument("--adam_weight_decay", type=float, default=weight_decay, help="AdamW weight decay")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the memory ladder's optimizer and of the EMA, the same in both trainers."""
    parser.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: 1/4 of their memory); needs the bnb extra",
    )
    parser.add_argument("--use_ema", action="store_true", help="keep an EMA of the trainable weights")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    parser.add_argument("--ema_update_after_step", type=int, default=0, help="EMA copies the weights until this step")


def check_optimizer_arguments(args: argparse.Namespace) -> None:
    """Bad values and a missing optional package, before any model loads."""
    if not 0.0 <= args.ema_decay <= 1.0:
        raise UsageError(f"--ema_decay {args.ema_decay}: must be within [0, 1]")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            "--use_8bit_adam needs bitsandbytes, which is not installed: pip install -e '.[bnb]' (or drop the flag)"
        )


def make_optimizer(params: Sequence[torch.nn.Parameter], args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """AdamW over `params` with the run's betas, weight decay and epsilon; 8-bit states with --use_8bit_adam."""
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class: Any = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        list(params),
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_ema(params: Sequence[torch.nn.Parameter], args: argparse.Namespace, accelerator: Any) -> Any | None:
    """diffusers' `EMAModel` over the trainable `params` (fp32 shadows), registered for accelerate's checkpoints;
    None without --use_ema. Call after the trainables are on their device and in their training dtype."""
    if not args.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(list(params), decay=args.ema_decay, update_after_step=args.ema_update_after_step)
    accelerator.register_for_checkpointing(ema)
    return ema


def ema_on_device(ema: Any | None, device: torch.device) -> None:
    """After `load_state`: accelerate loads custom states on the CPU; the shadows must live with the weights."""
    if ema is not None:
        ema.to(device=device)


@contextlib.contextmanager
def averaged_weights(ema: Any | None, params: Sequence[torch.nn.Parameter]) -> Iterator[bool]:
    """Within the block the model holds the EMA weights (yields True), the raw ones again after; a no-op (yields
    False) without an EMA. The raw weights come back bit for bit, so validation never changes the run."""
    if ema is None:
        yield False
        return
    params = list(params)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield True
    finally:
        ema.restore(params)


def ema_digest(ema: Any | None) -> str | None:
    """sha256 of the EMA's shadow weights in order (None without an EMA): equal across ranks and across an exact
    resume."""
    if ema is None:
        return None
    digest = hashlib.sha256()
    for shadow in ema.shadow_params:
        digest.update(shadow.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def init_weights_kind(path: str | None) -> str | None:
    """Which weights `--init_from` takes: "ema" or "raw" for one of our exports (as its export.json records; exports
    from before EMA existed are raw), "released" for anything else; None without --init_from. Pass the export's
    `ema/` folder to start from the EMA weights."""
    if not path:
        return None
    folder = Path(path)
    record = folder / "export.json" if folder.is_dir() else None
    if record is None or not record.is_file():
        nested = folder / "export" / "export.json"  # a GSRP run folder stands for its export
        record = nested if nested.is_file() else None
    if record is None:
        return "released"
    try:
        return str(json.loads(record.read_text()).get("weights", "raw"))
    except (OSError, ValueError):
        return "released"
