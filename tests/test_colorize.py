"""Colorize end to end with tiny real models: our exports, the released layout, a benchmark scored by evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from colorize_fixtures import CORRUPT_PAGE, drawn_page, save_random_screenstyle, save_tiny_clip_vision, write_chapter
from PIL import Image

from jobs.colorize import cli as colorize_main

STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def chapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_chapter(tmp_path_factory.mktemp("chapter"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD1.5 folder, our ICP and GSRP exports of it, and the same weights in the released folder layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from model.colorguider import ColorGuider
    from model.gsrp_fusion import GSRPFusion
    from model.gsrp_weights import save_gsrp_export
    from model.icp_weights import save_icp_export, write_released_icp_layout
    from model.lora import add_icp_lora
    from model.tiny import build_tiny_sd15

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    sd15 = build_tiny_sd15(root / "sd15")
    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    guider = ColorGuider.from_unet(unet)
    add_icp_lora(unet)
    icp = save_icp_export(root / "icp", guider, unet, {"prompt": "manga", "frame_size": [64, 96]})
    fusion = GSRPFusion.from_vae_config(AutoencoderKL.from_pretrained(sd15, subfolder="vae").config)
    gsrp = save_gsrp_export(root / "gsrp", fusion, {"sr_scale": 1.5})
    release = root / "release"
    write_released_icp_layout(release / "GraySD", guider, unet)
    fusion.save_released(release / "GraySD" / "MultiResNetModel.bin")
    save_tiny_clip_vision(release / "image_encoder")
    save_random_screenstyle(release / "ScreenStyle")
    return {"sd15": sd15, "icp": icp, "gsrp": gsrp, "release": release}


def _run(args: list[str]) -> tuple[int, dict]:
    code = colorize_main(args)
    output = Path(args[args.index("--output") + 1])
    return code, json.loads((output / "colorize.summary.json").read_text())


def test_colors_a_chapter_skips_finished_pages_and_redoes_changed_settings(chapter, tiny_models, tmp_path) -> None:
    pages, refs = chapter
    out = tmp_path / "out"
    args = ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--encoder", "weightfree", "--local"]
    args += ["--icp", str(tiny_models["icp"]), "--gsrp", str(tiny_models["gsrp"]), "--sd15", str(tiny_models["sd15"])]
    code, summary = _run([*args, *STEPS])  # the frame size comes from the export: 64x96, GSRP 1.5x
    assert code == 1 and summary["pages_failed"] == 1  # the corrupt page, reported; the others finish
    assert summary["failures"][0]["page"] == CORRUPT_PAGE and "not an image" in summary["failures"][0]["error"]
    assert [r["page"] for r in summary["page_rows"]] == ["1.png", "2.png", "3.png", CORRUPT_PAGE, "10.png"]
    assert summary["settings"]["size"] == [64, 96] and summary["settings"]["sr_size"] == [96, 144]
    first = {}
    for stem in ("1", "2", "3", "10"):
        page = Image.open(out / f"{stem}.png")
        assert page.size == (96, 144) and page.mode == "RGB"
        assert Image.open(out / "contact_sheets" / f"{stem}.jpg").width > page.width
        first[stem] = (np.asarray(page), (out / f"{stem}.png").stat().st_mtime_ns)
    assert not (out / "5.png").exists()

    code, again = _run([*args, *STEPS])
    assert again["pages_skipped"] == 4 and again["pages_done"] == 0
    assert all((out / f"{stem}.png").stat().st_mtime_ns == first[stem][1] for stem in first)

    code, redone = _run([*args, "--steps", "3"])
    assert redone["pages_done"] == 4 and redone["pages_skipped"] == 0
    assert redone["settings_fingerprint"] != summary["settings_fingerprint"]
    record = json.loads((out / "2.json").read_text())
    assert record["settings"]["sampling"]["steps"] == 3 and len(record["retrievals"]) == 12
    assert colorize_main([*args, "--memory", "offload", "--device", "cpu"]) == 2  # offload needs CUDA workers


def test_released_layout_loads_through_colorflow_weights_on_ray(chapter, tiny_models, tmp_path, ray_local) -> None:
    """`--colorflow-weights` takes GraySD/ (guider, LoRA, GSRP) and retrieves with its image_encoder/ (CLIP vision),
    here in a Ray CPU actor that loads the models once."""
    pages, refs = chapter
    out = tmp_path / "out"
    args = ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--size", "64x96", *STEPS]
    args += ["--colorflow-weights", str(tiny_models["release"]), "--sd15", str(tiny_models["sd15"])]
    code, summary = _run(args)
    assert summary["settings"]["style"] == "screenstyle"  # the app's GrayImage(ScreenStyle), from ScreenStyle/
    assert summary["settings"]["sampling"]["gsrp_statistics"] == "page"  # the released fusion file, as the app
    assert summary["settings"]["resample"] == "bicubic"
    assert summary["settings"]["encoder"]["spec"].startswith("clip_vision:")
    assert summary["settings"]["encoder"]["spec"].endswith("image_encoder")
    assert summary["pages_done"] == 4 and summary["pages_failed"] == 1
    assert Image.open(out / "10.png").size == (96, 144)
    # the Ray actor retrieved what an in-process run retrieves (references only: no model loaded there)
    local = tmp_path / "local"
    _run([*args[: args.index("--output")], "--output", str(local), *args[args.index("--output") + 2 :],
          "--references-only", "--local"])  # fmt: skip
    for stem in ("1", "2", "3", "10"):
        on_ray = json.loads((out / f"{stem}.json").read_text())["retrievals"]
        assert on_ray == json.loads((local / f"{stem}.json").read_text())["retrievals"]


def test_benchmark_predictions_are_scored_by_evaluate(pipeline_data, tiny_models, tmp_path) -> None:
    from jobs.evaluate import main as evaluate_main
    from pipelines.core.benchmark_format import read_benchmark, read_chapter_index

    bench = pipeline_data / "benchmark"
    out = tmp_path / "pred"
    args = ["--benchmark", str(bench), "--style", "grey", "--output", str(out), "--size", "128x192", *STEPS]
    args += ["--icp", str(tiny_models["icp"]), "--gsrp", str(tiny_models["gsrp"]), "--sd15", str(tiny_models["sd15"])]
    code, summary = _run([*args, "--encoder", "weightfree", "--local", "--batch-size", "4"])
    assert code == 0 and summary["style"] == "grey"
    chapters = [c["chapter_id"] for c in read_benchmark(bench)["chapters"]]
    index = read_chapter_index(bench, chapters[0])
    for entry in index["bw"]:
        prediction = Image.open(out / chapters[0] / f"{entry['page_id']}.png")
        assert prediction.size == Image.open(bench / chapters[0] / entry["gt"]).size
    scored = evaluate_main(["--pred", str(out), "--truth", str(bench)])
    assert scored["scored"] == len(index["bw"]) * len(chapters) and scored["failed"] == 0
    assert scored["style"]["name"] == "grey" and scored["style"]["source"] != "--style"  # read from our summary
    code = colorize_main([*args, "--encoder", "weightfree", "--local", "--style", "nosuchstyle"])
    assert code == 2


def test_weight_token_ignores_a_training_runs_checkpoints_and_logs(tmp_path: Path) -> None:
    from inference.models import files_token

    run = tmp_path / "icp-run"  # train_icp writes its export at the top of the run folder
    (run / "colorguider").mkdir(parents=True)
    (run / "colorguider" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (run / "export.json").write_text("{}")
    token = files_token(str(run))
    (run / "logs" / "train_icp").mkdir(parents=True)
    (run / "logs" / "train_icp" / "events.out.tfevents.1").write_bytes(b"event")
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "optimizer.bin").write_bytes(b"state")
    (run / "prompt_embeds").mkdir()
    (run / "prompt_embeds" / "abc.safetensors").write_bytes(b"cached prompt")
    assert files_token(str(run)) == token  # training went on beside the export, a prompt was cached: still valid
    (run / "colorguider" / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")
    assert files_token(str(run)) != token  # a new export redoes them


def test_screenstyle_style_end_to_end_and_missing_weights(tiny_models, tmp_path) -> None:
    """One 120x180 page in the screenstyle style with our exports and random ScreenStyle weights: the ICP frame
    is the ScreenStyle/grey blend (not the grey page), the run record says so; without weights, one line, exit 2."""
    from inference.styles import PageStyler

    pages, refs = tmp_path / "pages", tmp_path / "refs"
    pages.mkdir()
    refs.mkdir()
    drawn_page(7).convert("L").save(pages / "1.png")
    for i in range(3):
        drawn_page(i).save(refs / f"r{i}.png")
    screenstyle = save_random_screenstyle(tmp_path / "screenstyle")
    out = tmp_path / "out"
    args = ["--pages", str(pages), "--refs", str(refs), "--size", "64x96", *STEPS, "--local", "--encoder", "weightfree"]
    args += ["--icp", str(tiny_models["icp"]), "--gsrp", str(tiny_models["gsrp"]), "--sd15", str(tiny_models["sd15"])]
    code, summary = _run([*args, "--output", str(out), "--style", "screenstyle", "--screenstyle-weights",
                          str(screenstyle)])  # fmt: skip
    assert code == 0 and summary["pages_done"] == 1
    assert summary["settings"]["style"] == "screenstyle" and summary["settings"]["screenstyle_weights"]
    assert summary["settings"]["sampling"]["gsrp_statistics"] == "running"  # our export records nothing: eval
    assert Image.open(out / "1.png").size == (96, 144)
    page = Image.open(pages / "1.png")
    styled = PageStyler("screenstyle", str(screenstyle), "cpu").frames(page, (64, 96), (96, 144), 0)
    grey = PageStyler("grey").frames(page, (64, 96), (96, 144), 0)
    assert styled[1].size == (96, 144) and not np.array_equal(np.asarray(styled[0]), np.asarray(grey[0]))
    assert colorize_main([*args, "--output", str(tmp_path / "o"), "--style", "screenstyle"]) == 2


def test_no_guidance_runs_without_a_text_encoder_once_the_prompt_is_cached(chapter, tiny_models, tmp_path) -> None:
    from inference.models import Colorizer, ModelPaths, PageBatchItem, SamplingOptions
    from pipelines.core.geometry import CompositeLayout
    from pipelines.core.sample_inputs import composite_inputs

    paths = ModelPaths(str(tiny_models["sd15"]), str(tiny_models["icp"]), None, str(tmp_path / "cache"))
    sampling = SamplingOptions(steps=2, guidance_scale=1.0)
    layout = CompositeLayout(64, 96)
    bw = drawn_page(3, 64, 96).convert("L").convert("RGB")
    canvases = composite_inputs(layout, drawn_page(4, 128, 192), bw)
    item = PageBatchItem(canvases.refs_only, canvases.frame_only, canvases.mask, bw.resize((96, 144)), 5)
    first = Colorizer(paths, sampling, "cpu")
    assert first.pipeline.text_encoder is None  # embedded once, cached, dropped
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    cached = Colorizer(paths, sampling, "cpu")
    assert cached.pipeline.text_encoder is None and cached.pipeline.tokenizer is None
    assert torch.equal(first.prompt_embeds, cached.prompt_embeds)
    assert np.array_equal(np.asarray(first.colorize([item], layout)[0]), np.asarray(cached.colorize([item], layout)[0]))
    guided = Colorizer(paths, SamplingOptions(steps=2, guidance_scale=7.5), "cpu")
    assert guided.pipeline.text_encoder is not None and guided.prompt_embeds is None


def test_damaged_inputs_are_refused_before_work_starts_and_leave_no_folder(
    pipeline_data, tiny_models, tmp_path, capsys
) -> None:
    from pipelines.core.benchmark_format import read_benchmark, read_chapter_index

    bench = tmp_path / "bench"
    shutil.copytree(pipeline_data / "benchmark", bench)
    chapter = read_benchmark(bench)["chapters"][0]["chapter_id"]
    listed = read_chapter_index(bench, chapter)["bw"][1]["inputs"]["grey"]
    (bench / chapter / listed).unlink()  # listed in the index, gone from disk
    out = tmp_path / "new" / "pred"
    args = ["--benchmark", str(bench), "--style", "grey", "--output", str(out), "--references-only", "--local"]
    assert colorize_main([*args, "--encoder", "weightfree"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"python -m jobs.colorize: error: benchmark {bench}: chapter {chapter} lists {listed} but "
        f"{bench / chapter / listed} does not exist; copy the benchmark again or rebuild it with python -m "
        "jobs.shards --data OUT --rebuild"
    ]
    pages, refs = tmp_path / "pages", tmp_path / "refs"
    pages.mkdir()
    refs.mkdir()
    swapped = ["--pages", str(pages), "--refs", str(refs), "--output", str(out), "--local"]
    assert colorize_main([*swapped, "--icp", str(tiny_models["gsrp"]), "--sd15", str(tiny_models["sd15"])]) == 2
    assert "--icp" in capsys.readouterr().err
    assert colorize_main([*swapped, "--icp", str(tiny_models["icp"]), "--gsrp", str(tiny_models["icp"])]) == 2
    assert "not GSRP weights" in capsys.readouterr().err
    # a missing page folder is named before anything starts Ray (choosing the dtype without --device would)
    ray_was_running = ray.is_initialized()
    missing = ["--pages", str(tmp_path / "absent"), "--refs", str(refs), "--output", str(out)]
    assert colorize_main([*missing, "--icp", str(tiny_models["icp"]), "--sd15", str(tiny_models["sd15"])]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running
    assert not (tmp_path / "new").exists()
