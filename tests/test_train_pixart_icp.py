"""The PixArt (line-art family) ICP trainer on CPU: the tiny PixArt folder, its text cache and the `pipeline_data`
shards (4 shards of 6 at 128x192)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.text_cache import build_text_cache, save_text_cache
from model.tiny_pixart import build_tiny_pixart
from training.train_pixart_icp import cli, load_models, main, parse_args

pytestmark = pytest.mark.usefixtures("frugal_threads")
FAST = [
    "--train_batch_size", "2", "--resolution", "64x96", "--dataloader_num_workers", "0", "--validation_steps", "0",
    "--report_to", "none", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-3",
    "--prompt_drop_probability", "0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny PixArt folder, its "manga" text cache)."""
    root = tmp_path_factory.mktemp("pixart")
    folder = build_tiny_pixart(root / "tiny-pixart")
    cache = save_text_cache(build_text_cache(folder, "manga"), root / "manga-t5.safetensors")
    return folder, cache


def _args(pixart: tuple[Path, Path], data: str | Path, out: Path, *extra: str) -> list[str]:
    folder, cache = pixart
    base = ["--pretrained_model_name_or_path", str(folder), "--text_cache", str(cache), "--data", str(data)]
    return [*base, "--output_dir", str(out), *FAST, *extra]


def _weights(export: Path) -> dict[str, torch.Tensor]:
    guider = torch.load(export / "diffusion_pytorch_model.bin", weights_only=True)
    lora = torch.load(export / "transformer_lora.bin", weights_only=True)
    return {**{f"guider.{k}": v for k, v in guider.items()}, **{f"lora.{k}": v for k, v in lora.items()}}


def test_arguments_default_to_the_release_and_refuse_bad_values(capsys: pytest.CaptureFixture) -> None:
    required = ["--pretrained_model_name_or_path", "p", "--text_cache", "c", "--data", "d", "--output_dir", "o"]
    args = parse_args(required)
    assert (args.lora_rank, args.lora_alpha, args.timestep_mu, args.prompt_drop_probability) == (128, 128.0, 1.5, 0.1)
    assert args.validation_guidance_scale == 4.5 and not args.gradient_checkpointing
    assert parse_args([*required, "--no_timestep_shift"]).timestep_mu == 0.0
    assert cli([*required, "--prompt_drop_probability", "1.5"]) == 2
    assert "--prompt_drop_probability 1.5: must be within [0, 1]" in capsys.readouterr().err
    assert cli(required[:-4]) == 2  # no --text_cache: T5 is never loaded, so the cache is required


def test_only_the_guider_and_the_lora_train_and_t5_is_never_loaded(
    pixart: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the trainer loaded the text encoder")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    models = load_models(parse_args(_args(pixart, "d", tmp_path)))
    model = models["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("guider.") or ".lora_" in n for n in trainable)
    assert {n for n in trainable if n.startswith("guider.")} == {
        f"guider.{n}" for n, _ in model.guider.named_parameters()
    }
    assert all(
        n.startswith("transformer.") and ".lora_" not in n for n, p in model.named_parameters() if not p.requires_grad
    )
    assert any("pos_embed.proj.lora_A" in n for n in trainable) and any("proj_out.lora_B" in n for n in trainable)
    assert not any(p.requires_grad for p in models["vae"].parameters())
    assert models["text"].prompt_embeds.shape == (1, 120, 32)


def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    pixart: tuple[Path, Path], pipeline_data: Path, tmp_path: Path
) -> None:
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2", "--gradient_checkpointing"]
    straight = main(parse_args(_args(pixart, pipeline_data, tmp_path / "straight", "--max_train_steps", "4", *common)))
    stopped = tmp_path / "stopped"
    main(parse_args(_args(pixart, pipeline_data, stopped, "--max_train_steps", "2", *common)))
    first_export = _weights(stopped / "export")
    resumed_args = ["--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common]
    main(parse_args(_args(pixart, pipeline_data, stopped, *resumed_args)))
    expected, resumed = _weights(tmp_path / "straight" / "export"), _weights(stopped / "export")
    assert expected.keys() == resumed.keys() and "guider.after_proj.weight" in expected
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert any(not torch.equal(first_export[k], resumed[k]) for k in expected)  # the resumed steps did train
    assert straight["steps"] == 4 and straight["samples"] == 16
    state = json.loads((stopped / "checkpoint-4" / "train_state.json").read_text())
    assert state["global_step"] == 4 and state["samples_per_rank"] == 16
    assert (stopped / "checkpoint-4" / "lineart" / "transformer_lora.bin").is_file()
    export = json.loads((stopped / "export" / "export.json").read_text())
    assert export["lora"]["rank"] == 4 and export["prompt"] == "manga" and export["prompt_drop_probability"] == 0.5
    with pytest.raises(ValueError, match="cannot resume exactly"):
        changed = ["--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--train_batch_size", "3"]
        main(parse_args(_args(pixart, pipeline_data, stopped, *changed)))


def test_the_export_loads_into_the_pipeline_and_validation_is_logged(
    pixart: tuple[Path, Path], pipeline_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra = ["--max_train_steps", "1", "--report_to", "tensorboard", "--validation_steps", "1"]
    extra += ["--num_validation_samples", "1", "--validation_inference_steps", "2"]
    main(parse_args(_args(pixart, pipeline_data, out, *extra)))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(out.glob("logs/**/events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert "validation" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]
    from model.lineart_weights import load_lineart_pipeline

    pipeline = load_lineart_pipeline(pixart[0], out / "export")
    saved = _weights(out / "export")
    guider = pipeline.guider.state_dict()
    assert all(torch.equal(guider[k.removeprefix("guider.")], v) for k, v in saved.items() if "adapter" in k)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.startswith("guider.adapter_linear"))


def test_sketch_from_the_shards_line_art_to_a_scored_benchmark_and_shading_colours_it(
    pixart: tuple[Path, Path], pipeline_data: Path, tmp_path: Path
) -> None:
    """Data -> train -> colorize -> evaluate in the sketch style: the pipeline's shards hold the line art the
    trainer reads (ICP the sketch member, GSRP the plain line art), the benchmark has both line-art styles, and the
    trained export colours and scores them."""
    from PIL import Image

    from jobs.colorize import cli as colorize_cli
    from jobs.evaluate import main as evaluate_main
    from pipelines.core.benchmark_format import read_benchmark, read_chapter_index
    from pipelines.core.sample_inputs import as_image
    from training.data import (
        GSRPDataConfig,
        ICPDataConfig,
        first_samples,
        gsrp_sample,
        icp_canvases,
        resolve_shard_source,
        to_tensor,
    )

    source = resolve_shard_source(pipeline_data)
    assert source.sample_format_version == 3
    raw = first_samples(source.urls, 1)[0]
    sketch = as_image(raw[".sketch.png"], "sketch.png", "RGB")
    canvases = icp_canvases(raw, ICPDataConfig(variant="sketch"), seed=0, epoch=0)
    assert canvases.alpha == 0.0
    left, top, right, bottom = canvases.layout.centre_box
    assert np.array_equal(np.asarray(canvases.composite.frame_only)[top:bottom, left:right], np.asarray(sketch))
    guide = gsrp_sample(raw, 0, config=GSRPDataConfig(crop_size=(64, 64), variant="shading"), seed=0)
    box = tuple(guide["crop"].tolist())
    hr_sketch = as_image(raw[".hr_sketch.png"], "hr_sketch.png", "RGB")
    assert torch.equal(guide["hr_bw"], to_tensor(hr_sketch.crop(box)))

    run = tmp_path / "run"
    trained = main(parse_args(_args(pixart, pipeline_data, run, "--max_train_steps", "2")))  # --bw_variant sketch
    assert trained["steps"] == 2 and trained["bad_samples_skipped"] == 0
    assert json.loads((run / "export" / "export.json").read_text())["bw_variant"] == "sketch"

    bench = pipeline_data / "benchmark"
    chapter = read_benchmark(bench)["chapters"][0]["chapter_id"]
    index = read_chapter_index(bench, chapter)
    assert {"sketch", "shading"} <= set(index["styles"]) and index["styles"]["sketch"]["renderer_id"] == "xdog"
    common = ["--icp", str(run), "--size", "64x96", "--steps", "2", "--local", "--encoder", "weightfree"]
    for style in ("sketch", "shading"):
        pred = tmp_path / style
        assert colorize_cli(["--benchmark", str(bench), "--style", style, "--output", str(pred), *common]) == 0
        summary = json.loads((pred / "colorize.summary.json").read_text())
        assert summary["settings"]["family"] == "pixart" and summary["pages_done"] == len(index["bw"])
        gt = Image.open(bench / chapter / index["bw"][0]["gt"])
        assert Image.open(pred / chapter / f"{index['bw'][0]['page_id']}.png").size == gt.size
    scored = evaluate_main(["--pred", str(tmp_path / "sketch"), "--truth", str(bench)])
    assert scored["scored"] == len(index["bw"]) and scored["failed"] == 0
    assert scored["style"] == {"name": "sketch", "renderer_id": "xdog", "source": "PRED/colorize.summary.json"}


def test_shards_without_line_art_are_refused_in_one_line_before_the_models_load(
    pipeline_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(pipeline_data / "shards", data / "shards")
    for path in (data / "shards" / "train").glob("manifest*.json"):  # as a format-2 dataset records itself
        spec = json.loads(path.read_text())
        generations = [{**g, "sample_format_version": 2} for g in spec.get("generations", [])]
        path.write_text(json.dumps({**spec, "sample_format_version": 2, "generations": generations}))
    args = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--text_cache", str(tmp_path / "no-cache")]
    assert cli([*args, "--data", str(data), "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "version 2, without line art; the 'sketch' style needs version 3" in err[0]
    assert "--rebuild" in err[0] and not (tmp_path / "out").exists()
