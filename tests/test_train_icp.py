"""The ICP trainer on CPU: the tiny SD1.5 folder and the `pipeline_data` shards (4 shards of 6 at 128x192)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.tiny import build_tiny_sd15
from training.train_icp import cli, load_models, main, parse_args

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
FAST = [
    "--train_batch_size", "2", "--resolution", "64x96", "--dataloader_num_workers", "0", "--validation_steps", "0",
    "--report_to", "none", "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "5e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "tiny-sd15")


def _args(sd15: Path, data: str | Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(sd15), "--data", str(data), "--output_dir", str(out), *FAST, *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    guider = load_file(folder / "colorguider" / "diffusion_pytorch_model.safetensors")
    lora = load_file(folder / "unet_lora" / "pytorch_lora_weights.safetensors")
    return {**{f"guider.{k}": v for k, v in guider.items()}, **{f"lora.{k}": v for k, v in lora.items()}}


def _launch(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*command, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_arguments_follow_the_paper_defaults_and_refuse_bad_values(capsys: pytest.CaptureFixture) -> None:
    required = ["--pretrained_model_name_or_path", "sd", "--data", "d", "--output_dir", "o"]
    args = parse_args(required)
    assert (args.learning_rate, args.prompt, args.timestep_mu, args.resolution) == (1e-5, "manga", 1.5, None)
    assert args.crop_scale == (1.25, 2.0) and args.bw_variant == "screenstyle"
    flat = parse_args(
        ["--pretrained_model_name_or_path", "sd", "--data", "d", "--output_dir", "o", "--no_timestep_shift"]
    )
    assert flat.timestep_mu == 0.0
    assert (
        cli(["--pretrained_model_name_or_path", "sd", "--data", "d", "--output_dir", "o", "--crop_scale", "2,1"]) == 2
    )
    assert "LOW must not exceed HIGH" in capsys.readouterr().err


def test_a_missing_dataset_is_one_line_and_exit_status_1(sd15: Path, tmp_path: Path, capsys) -> None:
    assert cli(_args(sd15, tmp_path / "nowhere", tmp_path / "run", "--max_train_steps", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_icp: error:") and "nowhere" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_only_the_guider_and_the_lora_train(sd15: Path, tmp_path: Path) -> None:
    models = load_models(parse_args(_args(sd15, "d", tmp_path)))
    trainable = {n for n, p in models["model"].named_parameters() if p.requires_grad}
    frozen = {n for n, p in models["model"].named_parameters() if not p.requires_grad}
    assert trainable and all(n.startswith("guider.") or ".lora_" in n for n in trainable)
    assert all(n.startswith("unet.") and ".lora_" not in n for n in frozen)
    assert {n for n in trainable if n.startswith("guider.")} == {
        f"guider.{n}" for n, _ in models["model"].guider.named_parameters()
    }
    assert not any(p.requires_grad for p in models["vae"].parameters())
    assert not any(p.requires_grad for p in models["text_encoder"].parameters())


def test_a_short_run_overfits_a_handful_of_samples(sd15: Path, pipeline_data: Path, tmp_path: Path) -> None:
    shard = pipeline_data / "shards" / "train" / "train-g0000-000000.tar"  # 6 samples
    summary = main(parse_args(_args(sd15, shard, tmp_path / "run", "--max_train_steps", "50", "--bw_variant", "grey")))
    first, last = summary["loss_first_steps"][0], summary["loss_last_steps"][-5:]
    assert sum(last) / len(last) <= 0.5 * first, (first, last)
    assert summary["steps"] == 50 and summary["samples"] == 100 and summary["bad_samples_skipped"] == 0


def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2"]
    main(parse_args(_args(sd15, pipeline_data, tmp_path / "straight", "--max_train_steps", "4", *common)))
    stopped = tmp_path / "stopped"
    main(parse_args(_args(sd15, pipeline_data, stopped, "--max_train_steps", "2", *common)))
    first_export = _weights(stopped)
    main(
        parse_args(
            _args(sd15, pipeline_data, stopped, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
        )
    )
    straight, resumed = _weights(tmp_path / "straight"), _weights(stopped)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(first_export[k], resumed[k]) for k in straight)  # the resumed steps did train
    state = json.loads((stopped / "checkpoint-4" / "train_state.json").read_text())
    assert state["global_step"] == 4 and state["samples_per_rank"] == 16  # 4 steps x 2 micro-batches x 2 samples
    with pytest.raises(ValueError, match="cannot resume exactly"):
        changed = ["--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--train_batch_size", "3"]
        main(parse_args(_args(sd15, pipeline_data, stopped, *changed)))


def test_accelerate_launch_writes_checkpoints_tensorboard_and_a_loadable_export(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = _args(sd15, pipeline_data, out, "--max_train_steps", "3", "--checkpointing_steps", "1")
    argv += ["--checkpoints_total_limit", "2", "--report_to", "tensorboard", "--validation_steps", "3"]
    argv += ["--num_validation_samples", "1", "--validation_inference_steps", "2", "--histogram_steps", "3"]
    _launch("--num_processes", "1", "-m", "training.train_icp", *argv)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    checkpoint = out / "checkpoint-3"
    for name in ("colorguider/config.json", "unet_lora/pytorch_lora_weights.safetensors", "optimizer.bin"):
        assert (checkpoint / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(out.glob("logs/**/events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr"} <= set(tags["scalars"]) and "timesteps" in tags["histograms"]
    assert "validation" in tags["images"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]

    export = json.loads((out / "export.json").read_text())
    manifest = pipeline_data / "shards" / "train" / "manifest.json"
    import hashlib

    assert export["training_steps"] == 3 and export["prompt"] == "manga" and export["frame_size"] == [128, 192]
    assert export["shard_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert export["base_model"] == str(sd15)
    from model.icp_weights import load_icp_pipeline

    pipeline = load_icp_pipeline(sd15, out)
    saved = _weights(checkpoint)
    loaded_guider = pipeline.guider.state_dict()
    assert all(torch.equal(loaded_guider[k[len("guider.") :]], v) for k, v in saved.items() if k.startswith("guider."))
    lora = {k: v for k, v in pipeline.unet.state_dict().items() if ".lora_" in k}
    assert lora and any(float(v.abs().sum()) > 0 for k, v in lora.items() if ".lora_B" in k)


def test_two_processes_train_together_on_disjoint_samples(sd15: Path, pipeline_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    argv = _args(sd15, pipeline_data, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    argv += ["--record_sample_keys", "--dataloader_num_workers", "2", "--report_to", "tensorboard"]
    _launch("--multi_gpu", "--num_processes", "2", "-m", "training.train_icp", *argv)
    summary = json.loads((out / "train_icp.summary.json").read_text())
    assert summary["world_size"] == 2
    keys = summary["sample_keys_per_rank"]
    assert len(keys) == 2
    rank0, rank1 = ({k for batch in keys[r] for k in batch} for r in range(2))
    assert len(rank0) == len(rank1) == 4 and not rank0 & rank1
    digests = summary["trainable_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # all-reduced gradients: equal weights on both ranks
    assert summary["samples"] == 8
    # only the main process writes weights, state and events; the second rank adds only its own random states
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == [
        "colorguider", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
        "train_state.json", "unet_lora",
    ]  # fmt: skip
    assert not list(out.glob(".checkpoint-*"))  # no scratch folder left behind
    event_files = list(out.glob("logs/**/events.out.tfevents.*"))  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert event_files and len({p.name.split(".")[-2] for p in event_files}) == 1


def test_init_from_our_export_or_a_released_folder_starts_from_those_weights(sd15: Path, tmp_path: Path) -> None:
    from model.icp_weights import save_icp_export, write_released_icp_layout

    fresh = load_models(parse_args(_args(sd15, "d", tmp_path)))["model"]
    with torch.no_grad():
        for parameter in fresh.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.rand_like(parameter))  # zero convs and LoRA B become non-zero
    save_icp_export(tmp_path / "export", fresh.guider, fresh.unet, {"base_model": str(sd15)})
    write_released_icp_layout(tmp_path / "GraySD", fresh.guider, fresh.unet)
    expected = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    for folder in ("export", "GraySD"):
        loaded = load_models(parse_args(_args(sd15, "d", tmp_path, "--init_from", str(tmp_path / folder))))["model"]
        got = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected), folder
