"""The memory-ladder benches of the trainers (bench/bench_train_gsrp.py and bench_train_icp.py --rung) on their CPU
path: every rung's arguments file parsed by its trainer, the trainer's step timed with the file's settings on the
tiny models, the first rung the baseline of the ratios, a rung whose optional package is missing skipped in one
line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("frugal_threads")


def _bench(name: str):
    """A bench script as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gsrp_rungs_time_the_trainers_step_against_the_first_rung(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the shipped files include each other by repository-relative paths
    ema_rung = tmp_path / "ema.args"
    ema_rung.write_text("# half the batch, accumulated twice, with an EMA\n@configs/gsrp/paper.args\n"
                        "--train_batch_size 2 --gradient_accumulation_steps 2 --use_ema\n")  # fmt: skip
    rungs = ["configs/gsrp/paper.args", str(ema_rung), "configs/gsrp/memory-24gb.args"]
    _bench("bench_train_gsrp").main(["--rung", *rungs, "--size", "32x32", "--steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("GSRP memory ladder on CPU, tiny models") and "peak resident set" in lines[0]
    measured = re.compile(
        r"rung (\S+): crop 32x32, batch (\d) x (\d), checkpointing True, 8-bit AdamW (\w+), EMA (\w+): "
        r"([\d.]+) s/step, ([\d.]+) samples/s \(([\d.]+)x the first rung\), peak ([\d.]+) GiB"
    )
    rows = {m[1]: m.groups()[1:] for m in map(measured.search, lines[1:]) if m}
    paper, ema = rows["configs/gsrp/paper.args"], rows[str(ema_rung)]
    assert paper[:4] == ("4", "1", "False", "False") and ema[:4] == ("2", "2", "False", "True")
    assert paper[6] == "1.00" and float(ema[6]) > 0 and all(float(row[4]) > 0 for row in (paper, ema))
    seconds, samples = float(ema[4]), float(ema[5])
    assert samples == pytest.approx(4 / seconds, rel=0.01)  # 2 x 2 samples per optimizer step
    assert float(paper[7]) > 0.1  # the process's resident set holds at least torch
    if importlib.util.find_spec("bitsandbytes") is None:  # the 24 GB rung's 8-bit AdamW: one line when missing
        assert lines[-1] == (
            "  rung configs/gsrp/memory-24gb.args: skipped (--use_8bit_adam needs bitsandbytes, which is not "
            "installed: pip install -e '.[bnb]' (or drop the flag))"
        )
    else:
        assert rows["configs/gsrp/memory-24gb.args"][:4] == ("2", "2", "True", "False")


def test_icp_rungs_run_the_trainers_step_on_the_tiny_models(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    rungs = ["configs/icp/paper.args", "configs/icp/memory-24gb.args"]
    _bench("bench_train_icp").main(["--rung", *rungs, "--models", "tiny", "--size", "64x96", "--steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "memory ladder on CPU, tiny models, 64x96, bf16"
    paper = re.search(
        r"rung configs/icp/paper.args: batch 8 x 1, .* ([\d.]+) samples/s \(1.00x the first rung\)", lines[1]
    )
    assert paper and float(paper[1]) > 0
    if importlib.util.find_spec("bitsandbytes") is None:
        assert lines[2].startswith("  rung configs/icp/memory-24gb.args: skipped (--use_8bit_adam needs bitsandbytes")
    else:
        assert "batch 4 x 2, checkpointing True, 8-bit AdamW True" in lines[2]
