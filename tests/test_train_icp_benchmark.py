"""Benchmark metrics while training ICP: the `pipeline_data` benchmark coloured at each validation, its PSNR, SSIM
and CLIP-IS logged to TensorBoard as `jobs.evaluate` scores the same pages, and the best step in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.tiny import build_tiny_sd15
from training.benchmark_validation import gsrp_scale
from training.train_icp import cli, main, parse_args

torch.set_num_threads(1)
FAST = [
    "--train_batch_size", "2", "--resolution", "64x96", "--dataloader_num_workers", "0", "--lora_rank", "8",
    "--lora_alpha", "16", "--learning_rate", "5e-3", "--num_validation_samples", "1",
    "--validation_inference_steps", "2", "--validation_steps", "1", "--checkpointing_steps", "1",
]  # fmt: skip
METRICS = ("psnr", "ssim", "clip_is")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "tiny-sd15")


def _args(sd15: Path, data: Path, out: Path, *extra: str) -> list[str]:
    bench = ["--benchmark", str(data / "benchmark"), "--benchmark_pages", "2", "--benchmark_encoder", "weightfree"]
    return ["--pretrained_model_name_or_path", str(sd15), "--data", str(data), "--output_dir", str(out), *FAST, *bench,
            *extra]  # fmt: skip


def _evaluator_values(step_folder: Path, bench: Path) -> dict[str, dict[str, float]]:
    """Each saved page scored by jobs.evaluate's own code (float64 SSIM, CLIP-IS by the weight-free encoder)."""
    from evaluation.scoring import EvaluateOptions, collect_pairs, load_scorers, score_page

    scorers = load_scorers(EvaluateOptions(clip_encoder="weightfree"), "cpu")
    pairs = [p for p in collect_pairs(step_folder, bench, step_folder / "evaluate").pairs if p.prediction]
    return {pair.key: score_page(pair, scorers, None).values for pair in pairs}


def test_each_validation_logs_the_benchmark_metrics_the_evaluator_gives(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = main(parse_args(_args(sd15, pipeline_data, out, "--max_train_steps", "2", "--best_metric", "ssim")))
    events = EventAccumulator(str(next(out.glob("logs/**/events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    pages = summary["benchmark"]["pages"]
    assert len(pages) == 2
    assert {f"benchmark/{page}" for page in pages} <= set(events.Tags()["images"])
    means = {}
    for step in (1, 2):
        record = json.loads((out / "benchmark" / f"step-{step}" / "metrics.json").read_text())
        evaluated = _evaluator_values(out / "benchmark" / f"step-{step}", pipeline_data / "benchmark")
        assert sorted(evaluated) == sorted(pages)
        for row in record["pages"]:
            assert {m: row[m] for m in METRICS} == {
                m: evaluated[f"{row['chapter_id']}/{row['page_id']}"][m] for m in METRICS
            }
        means[step] = {m: sum(v[m] for v in evaluated.values()) / len(evaluated) for m in METRICS}
        assert record["mean"] == pytest.approx(means[step], rel=1e-12)
    for metric in METRICS:
        logged = {e.step: e.value for e in events.Scalars(f"benchmark/{metric}")}
        assert sorted(logged) == [1, 2]
        assert all(logged[s] == pytest.approx(means[s][metric], rel=1e-6) for s in (1, 2))  # float32 in the events
    assert means[1] != means[2]  # the step trained: the pages changed
    best = summary["benchmark"]["best"]
    assert best["metric"] == "ssim" and best["step"] == max((1, 2), key=lambda s: means[s]["ssim"])
    assert best["mean"] == pytest.approx(means[best["step"]], rel=1e-12)


def test_a_resumed_run_colours_the_benchmark_as_an_uninterrupted_one(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    straight = main(parse_args(_args(sd15, pipeline_data, tmp_path / "straight", "--max_train_steps", "2")))
    stopped = tmp_path / "stopped"
    main(parse_args(_args(sd15, pipeline_data, stopped, "--max_train_steps", "1")))
    resumed = main(
        parse_args(_args(sd15, pipeline_data, stopped, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    )
    for step in (1, 2):
        expected = (tmp_path / "straight" / "benchmark" / f"step-{step}" / "metrics.json").read_text()
        assert (stopped / "benchmark" / f"step-{step}" / "metrics.json").read_text() == expected
    assert resumed["benchmark"]["best"] == straight["benchmark"]["best"]  # the first run's step counts too
    assert sorted(resumed["benchmark"]["best"]["steps"]) == ["1", "2"]


def test_a_gsrp_export_finishes_the_benchmark_pages(sd15: Path, pipeline_data: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from PIL import Image

    from model.gsrp_fusion import GSRPFusion
    from model.gsrp_weights import save_gsrp_export

    fusion = GSRPFusion.from_vae_config(AutoencoderKL.from_pretrained(sd15, subfolder="vae").config)
    gsrp = save_gsrp_export(tmp_path / "gsrp", fusion, {"sr_scale": 2.0})
    assert (gsrp_scale(str(gsrp)), gsrp_scale(None)) == (2.0, 1.5)  # the export's scale, else colorize's default
    alone = main(parse_args(_args(sd15, pipeline_data, tmp_path / "alone", "--max_train_steps", "1")))
    finished = main(
        parse_args(
            _args(sd15, pipeline_data, tmp_path / "gsrp_run", "--max_train_steps", "1", "--benchmark_gsrp", str(gsrp))
        )
    )
    assert finished["benchmark"]["gsrp"] == str(gsrp) and alone["benchmark"]["gsrp"] is None
    from pipelines.core.benchmark_format import read_chapter_index

    bench = pipeline_data / "benchmark"
    for page in finished["benchmark"]["pages"]:
        chapter_id, page_id = page.split("/")
        entry = next(e for e in read_chapter_index(bench, chapter_id)["bw"] if e["page_id"] == page_id)
        with_gsrp = Image.open(tmp_path / "gsrp_run" / "benchmark" / "step-1" / f"{page}.png")
        without = Image.open(tmp_path / "alone" / "benchmark" / "step-1" / f"{page}.png")
        assert with_gsrp.size == without.size == Image.open(bench / chapter_id / entry["gt"]).size
        assert with_gsrp.tobytes() != without.tobytes()  # the VAE round trip of GSRP, not a bicubic upsampling


def test_more_benchmark_pages_than_the_benchmark_has_is_one_line(
    sd15: Path, pipeline_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _args(sd15, pipeline_data, tmp_path / "run", "--max_train_steps", "1", "--benchmark_pages", "1000")
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_icp: error:") and "--benchmark_pages 1000" in err[-1]
    assert not (tmp_path / "run").exists()


def test_screenstyle_benchmark_pages_are_styled_as_colorize_styles_them(
    sd15: Path, pipeline_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--benchmark_style screenstyle` takes the ScreenStyle weights colorize takes: its pages' frames and guides are
    colorize's `PageStyler` output (random ScreenStyle weights, on a benchmark copy whose index offers the style);
    without weights the run is refused in one line before a model loads."""
    import shutil

    from colorize_fixtures import save_random_screenstyle
    from PIL import Image

    from inference.styles import PageStyler
    from pipelines.core.benchmark_format import read_benchmark
    from pipelines.core.geometry import hires_size
    from pipelines.core.seeding import derive_seed
    from pipelines.core.storage import atomic_write_json, read_json
    from training.benchmark_validation import prepare_benchmark

    argv = _args(sd15, pipeline_data, tmp_path / "run", "--max_train_steps", "1", "--benchmark_style", "screenstyle")
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_icp: error:") and "--benchmark_screenstyle_weights DIR" in err[-1]
    assert not (tmp_path / "run").exists()

    bench = Path(shutil.copytree(pipeline_data / "benchmark", tmp_path / "benchmark"))
    for chapter in read_benchmark(bench)["chapters"]:  # the grey pages offered as the screenstyle style's input
        index_path = bench / chapter["chapter_id"] / "index.json"
        index = read_json(index_path)
        index["styles"]["screenstyle"] = {**index["styles"]["grey"], "renderer_id": "screenstyle-test"}
        for entry in index["bw"]:
            entry["inputs"]["screenstyle"] = entry["inputs"]["grey"]
        atomic_write_json(index_path, index)
    weights = str(save_random_screenstyle(tmp_path / "screenstyle"))
    size = (64, 96)
    styled = prepare_benchmark(str(bench), "screenstyle", 2, size, 1.5, "weightfree", 0, "cpu", weights)
    grey = prepare_benchmark(str(bench), "grey", 2, size, 1.5, "weightfree", 0, "cpu")
    styler = PageStyler("screenstyle", weights, "cpu")
    for page, plain in zip(styled, grey, strict=True):
        entry = next(e for e in read_json(bench / page.chapter_id / "index.json")["bw"] if e["page_id"] == page.page_id)
        name = Path(entry["inputs"]["grey"]).relative_to("bw_grey").as_posix()
        source = Image.open(bench / page.chapter_id / entry["inputs"]["grey"]).convert("RGB")
        _, guide = styler.frames(source, size, hires_size(*size, 1.5), derive_seed(0, "style", page.chapter_id, name))
        assert page.guide.tobytes() == guide.tobytes() and page.guide.tobytes() != plain.guide.tobytes()
        assert page.canvases.frame_only.tobytes() != plain.canvases.frame_only.tobytes()
