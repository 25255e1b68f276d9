"""GSRP trainer on the pipeline fixture's shards with the tiny SD1.5 folder: overfitting, exact resume, launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from model.gsrp_weights import load_gsrp, read_gsrp_export
from model.tiny import TINY_VAE_LAYOUT, build_tiny_sd15
from training.data import resolve_shard_source
from training.train_gsrp import cli, icp_size, main, parse_args

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("frugal_threads")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd") / "tiny-sd15")


@pytest.fixture(scope="module")
def overfit_vae(tmp_path_factory) -> Path:
    """A tiny 4-level VAE with two channels per norm group. With one channel per group (model.tiny's VAE) the
    random decoder's last GroupNorm pins every channel's mean, which bounds the L1 any fusion can reach."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_LAYOUT, norm_num_groups=2)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_shard(pipeline_data) -> str:
    """One train shard of the fixture (6 samples): a few pairs to overfit."""
    return resolve_shard_source(pipeline_data).urls[0]


def base_args(tiny_sd: Path, data: str, output: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd), "--data", data, "--output_dir", str(output),
        "--crop_size", "64x64", "--bw_variant", "grey", "--report_to", "none", "--seed", "3", *extra,
    ]  # fmt: skip


def test_icp_size_rounds_to_the_vae_factor():
    assert icp_size(1200, 768, 1.5, 8) == (800, 512)
    assert icp_size(64, 64, 1.5, 8) == (40, 40)
    assert icp_size(8, 8, 4.0, 8) == (8, 8)


def test_short_run_overfits_and_beats_the_plain_decode(overfit_vae, one_shard, tmp_path, capsys):
    """A few pairs (6 frames, 64x64 crops): the final L1 (mean of the last 5 steps) is at most half the first, and
    the fused output beats the plain VAE decode of the degraded input on those pairs by at least 1 dB PSNR;
    TensorBoard gets loss, lr, both PSNRs and the image rows."""
    argv = [
        "--vae", str(overfit_vae), "--data", one_shard, "--output_dir", str(tmp_path / "run"), "--crop_size", "64x64",
        "--bw_variant", "grey", "--seed", "3", "--validation_data", one_shard, "--num_validation_images", "6",
        "--train_batch_size", "3", "--max_train_steps", "100", "--learning_rate", "1e-2", "--norm", "group",
        "--checkpointing_steps", "1000", "--validation_steps", "50", "--report_to", "tensorboard",
    ]  # fmt: skip
    summary = main(parse_args(argv))
    first, final = summary["losses"][0], sum(summary["losses"][-5:]) / 5
    gain = summary["psnr"] - summary["psnr_plain_decode"]
    with capsys.disabled():
        print(
            f"\nGSRP overfit: L1 {first:.4f} -> {final:.4f}; PSNR fused {summary['psnr']:.2f} dB vs plain decode "
            f"{summary['psnr_plain_decode']:.2f} dB (+{gain:.2f} dB)"
        )
    assert summary["global_step"] == 100 and summary["first_loss"] == first
    assert final <= 0.5 * first
    assert gain >= 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs" / "train_gsrp"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/psnr", "val/psnr_plain_decode"} <= set(tags["scalars"])
    assert "validation/0 degraded|output|target" in tags["images"]
    image = events.Images("validation/0 degraded|output|target")[-1]
    assert (image.width, image.height) == (3 * 64, 64)  # degraded | output | target side by side

    export = Path(summary["export"])
    record = read_gsrp_export(export)
    assert record["steps"] == 100 and record["sr_scale"] == 1.5
    assert record["shard_manifest_sha256"] == resolve_shard_source(one_shard).sha256
    assert load_gsrp(export).config.norm == "group"


def test_resume_is_exact(tiny_sd, pipeline_data, tmp_path):
    """Stopped at step 2 and resumed with --resume_from_checkpoint latest, a run ends bitwise where an uninterrupted
    run ends (BatchNorm statistics updating, accumulation 2, the whole train split with its shuffling)."""
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--train_batch_size", "1", "--num_validation_images", "0", "--crop_size", "32x32"]  # fmt: skip
    whole = main(parse_args([*base_args(tiny_sd, str(pipeline_data), tmp_path / "whole"), *common]))
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    argv = [*base_args(tiny_sd, str(pipeline_data), tmp_path / "cut"), *common, "--resume_from_checkpoint", "latest"]
    resumed = main(parse_args(argv))
    assert resumed["global_step"] == 4
    assert resumed["final_loss"] == whole["final_loss"]
    want = load_file(Path(whole["export"]) / "fusion" / "diffusion_pytorch_model.safetensors")
    got = load_file(Path(resumed["export"]) / "fusion" / "diffusion_pytorch_model.safetensors")
    assert want.keys() == got.keys()
    assert any("running_mean" in key for key in want)
    for key, tensor in want.items():
        assert torch.equal(tensor, got[key]), key
    start = load_file(tmp_path / "whole" / "checkpoint-2" / "fusion" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[key], want[key]) for key in want)  # steps 3-4 did change the weights

    (tmp_path / "other").mkdir()  # another batch size would replay other samples: refused, not silently inexact
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "other" / "checkpoint-2")
    argv = [*base_args(tiny_sd, str(pipeline_data), tmp_path / "other"), *common, "--resume_from_checkpoint", "latest"]
    argv[argv.index("--gradient_accumulation_steps") + 1] = "1"
    with pytest.raises(ValueError, match="settings differ.*gradient_accumulation_steps"):
        main(parse_args(argv))


def test_init_from_a_release_freezes_batchnorm_statistics(tiny_sd, one_shard, tmp_path):
    """Fine-tuning a (fake, tiny) release: the running statistics stay as released, the affine parameters move."""
    from diffusers import AutoencoderKL

    from model.gsrp_fusion import GSRPFusion

    torch.manual_seed(0)
    release = GSRPFusion.from_vae_config(AutoencoderKL.load_config(tiny_sd, subfolder="vae"))
    path = release.save_released(tmp_path / "GraySD" / "MultiResNetModel.bin")
    argv = base_args(
        tiny_sd, one_shard, tmp_path / "ft", "--init_from", str(path.parent), "--max_train_steps", "2",
        "--num_validation_images", "1", "--crop_size", "32x32",
    )  # fmt: skip
    summary = main(parse_args(argv))
    tuned = load_gsrp(summary["export"])
    before, after = release.state_dict(), tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k or "num_batches" in k)
    assert not torch.equal(before["branches.0.blocks.0.norm1.weight"], after["branches.0.blocks.0.norm1.weight"])
    assert read_gsrp_export(summary["export"])["init_from"] == str(path.parent)


def test_bad_input_is_one_line_and_an_exit_code(tiny_sd, tmp_path, capsys):
    assert cli(["--data", str(tmp_path)]) == 2  # neither an SD folder nor --vae
    capsys.readouterr()
    assert cli(base_args(tiny_sd, str(tmp_path / "nowhere"), tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_gsrp: error:") and "nowhere" in err[0]


def test_accelerate_launch_writes_checkpoints_and_an_export(tiny_sd, one_shard, tmp_path):
    from accelerate.utils import write_basic_config

    config = tmp_path / "accelerate.json"
    write_basic_config(mixed_precision="no", save_location=str(config))
    output = tmp_path / "launched"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
        "-m", "training.train_gsrp",
        *base_args(tiny_sd, one_shard, output, "--max_train_steps", "3", "--checkpointing_steps", "1",
                   "--checkpoints_total_limit", "2", "--num_validation_images", "1", "--crop_size", "32x32"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (output / "checkpoint-3" / "fusion" / "config.json").is_file()
    record = json.loads((output / "export" / "export.json").read_text())
    assert record["steps"] == 3 and record["base_model"] == str(tiny_sd)
    fusion = load_gsrp(output / "export")
    assert tuple(fusion.config.encoder_channels) == (8, 8, 8, 16, 16)
