"""jobs.evaluate end to end: the benchmark folder `jobs.pipeline` builds, scored with perfect and degraded copies
of its ground truth; failures counted and listed; plain folders; errors as one line with an exit status."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from jobs.evaluate import cli
from jobs.evaluate import main as evaluate_main
from pipelines.core.benchmark_format import read_benchmark, read_chapter_index

torch.set_num_threads(1)

FID = "test_evaluate_metrics:tiny_extractor"  # a tiny conv net built by the test module (importable from tests/)


def ground_truth_pages(bench: Path) -> list[tuple[str, str, Path]]:
    """(chapter_id, page_id, ground-truth file) of every B&W page of a benchmark, from its index."""
    pages = []
    for chapter in read_benchmark(bench)["chapters"]:
        index = read_chapter_index(bench, chapter["chapter_id"])
        pages += [(chapter["chapter_id"], p["page_id"], bench / chapter["chapter_id"] / p["gt"]) for p in index["bw"]]
    return pages


def degrade(image: Image.Image, seed: int) -> Image.Image:
    """Blur and noise: what a poor colourisation looks like to every metric."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, 12.0, blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def write_predictions(bench: Path, pred: Path, style: str, degraded: bool) -> Path:
    """PRED/<chapter>/<page>.png from the ground truth (decoded, so a perfect copy is pixel-identical)."""
    for i, (chapter_id, page_id, gt) in enumerate(ground_truth_pages(bench)):
        (pred / chapter_id).mkdir(parents=True, exist_ok=True)
        with Image.open(gt) as image:
            page = image.convert("RGB")
        (degrade(page, i) if degraded else page).save(pred / chapter_id / f"{page_id}.png")
    (pred / "colorize.summary.json").write_text(json.dumps({"style": style}))
    return pred


@pytest.fixture(scope="module")
def bench(pipeline_data: Path) -> Path:
    return pipeline_data / "benchmark"


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded LAION-shaped head (layers.* Linear stack, no activation) on the weight-free encoder's 639-d vectors."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(639, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_perfect_prediction_scores_above_a_degraded_one(bench: Path, aesthetic_head: Path, tmp_path: Path) -> None:
    options = ["--clip-encoder", "weightfree", "--fid-features", FID, "--fid-per-chapter"]
    options += ["--aesthetic-predictor", str(aesthetic_head)]
    tables = {}
    for name in ("perfect", "degraded"):
        pred = write_predictions(bench, tmp_path / name, "grey", degraded=name == "degraded")
        summary = evaluate_main(["--pred", str(pred), "--truth", str(bench), *options])
        out = pred / "evaluate"
        assert summary["scored"] == 8 and summary["failed"] == 0 and summary["complete"]
        assert json.loads((out / "evaluate.summary.json").read_text())["scored"] == 8
        overall, paper = read_csv(out / "overall.csv")
        assert paper["scope"] == "paper: ColorFlow, greyscale" and paper["psnr"] == "26.01" and paper["fid"] == "12.17"
        per_chapter = read_csv(out / "per_chapter.csv")
        assert [r["scope"] for r in per_chapter][1:] == ["overall", "paper: ColorFlow, greyscale"]
        assert per_chapter[0]["scope"] == ground_truth_pages(bench)[0][0] and per_chapter[0]["pages"] == "8"
        assert per_chapter[0]["fid"] == per_chapter[1]["fid"] != ""  # one chapter: its FID is the overall one
        assert "| overall | grey | 8 | 8 | 0 |" in (out / "overall.md").read_text()
        assert sorted(p.name for p in (out / "grids").iterdir()) == [
            "aesthetic.jpg",
            "clip_is.jpg",
            "psnr.jpg",
            "ssim.jpg",
        ]
        assert summary["metrics"]["skipped"] == {}
        assert summary["metrics"]["specs"]["clip_is"] == "weightfree"
        tables[name] = overall

    perfect, degraded = tables["perfect"], tables["degraded"]
    assert perfect["psnr"] == "inf" and 5.0 < float(degraded["psnr"]) < 40.0
    assert float(perfect["ssim"]) == 1.0 > float(degraded["ssim"])
    assert float(perfect["clip_is"]) == 1.0 > float(degraded["clip_is"])
    assert float(perfect["fid"]) == 0.0 < float(degraded["fid"])
    assert perfect["aesthetic"] != "" and degraded["aesthetic"] != ""
    summary = json.loads((tmp_path / "perfect" / "evaluate" / "evaluate.summary.json").read_text())
    assert summary["overall"]["psnr"] == "inf" and summary["psnr_infinite_pages"] == 8


def test_failures_are_counted_listed_and_not_fatal(bench: Path, tmp_path: Path, capsys) -> None:
    pred = write_predictions(bench, tmp_path / "pred", "halftone", degraded=False)
    pages = ground_truth_pages(bench)
    (pred / pages[0][0] / f"{pages[0][1]}.png").unlink()  # missing
    (pred / pages[1][0] / f"{pages[1][1]}.png").write_bytes(b"not a png")  # unreadable
    small = pred / pages[2][0] / f"{pages[2][1]}.png"
    with Image.open(small) as image:
        image.resize((image.width // 2, image.height // 2)).save(small)  # wrong size
    (pred / pages[3][0] / "misnamed.png").write_bytes(small.read_bytes())
    (pred / "contact_sheets" / pages[3][0]).mkdir(parents=True)
    (pred / "contact_sheets" / pages[3][0] / f"{pages[3][1]}.jpg").write_bytes(b"not a prediction")
    out = tmp_path / "out"
    fast = ["--ssim-precision", "float32"]
    assert cli(["--pred", str(pred), "--truth", str(bench), "--output", str(out), *fast]) == 0
    headline = "scored 5 of 8 pages (1 missing, 1 unreadable, 1 wrong_size not scored)"
    assert capsys.readouterr().out.splitlines()[0] == headline
    summary = json.loads((out / "evaluate.summary.json").read_text())
    assert (summary["scored"], summary["failed"]) == (5, 3) and summary["headline"] == headline
    assert cli(["--pred", str(pred), "--truth", str(bench), "--output", str(out), "--strict", *fast]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines()[-1] == (
        f"python -m jobs.evaluate: error: --strict: {headline}; first: no prediction {pages[0][0]}/{pages[0][1]}.png "
        "(nor .jpg/.jpeg/.webp)"
    )
    assert summary["failed_by_status"] == {"missing": 1, "unreadable": 1, "wrong_size": 1}
    reasons = {f["status"]: f["reason"] for f in summary["failures"]}
    assert "pass --resize" in reasons["wrong_size"] and f"{pages[2][1]}.png is " in reasons["wrong_size"]
    assert reasons["missing"].startswith(f"no prediction {pages[0][0]}/{pages[0][1]}.png")
    assert summary["extra_predictions"] == [f"{pages[3][0]}/misnamed.png"]
    assert summary["paper_row"] is None and summary["style"]["name"] == "halftone"
    assert summary["style"]["renderer_id"].startswith("halftone")
    assert summary["metrics"]["skipped"] == {
        "fid": "no --inception-weights or --fid-features given",
        "clip_is": "no --clip-encoder given",
        "aesthetic": "no --aesthetic-predictor given",
    }
    markdown = (out / "overall.md").read_text()
    assert "FID skipped: no --inception-weights or --fid-features given" in markdown
    assert "no paper row" in markdown and "3 pages not scored" in markdown
    assert [r["scope"] for r in read_csv(out / "overall.csv")] == ["overall"]
    overall = read_csv(out / "overall.csv")[0]
    assert (overall["pages"], overall["scored"], overall["failed"], overall["fid"]) == ("8", "5", "3", "")
    statuses = [r["status"] for r in read_csv(out / "per_page.csv")]
    assert sorted(statuses) == ["missing", "ok", "ok", "ok", "ok", "ok", "unreadable", "wrong_size"]

    assert cli(["--pred", str(pred), "--truth", str(bench), "--output", str(out), "--resize", "bicubic", *fast]) == 0
    summary = json.loads((out / "evaluate.summary.json").read_text())
    assert summary["scored"] == 6 and "wrong_size" not in summary["failed_by_status"]
    assert summary["metrics"]["specs"]["ssim"].endswith("float32")


def test_screenstyle_style_of_a_halftone_benchmark_is_refused(bench: Path, tmp_path: Path, capsys) -> None:
    pred = write_predictions(bench, tmp_path / "pred", "grey", degraded=False)
    assert cli(["--pred", str(pred), "--truth", str(bench), "--style", "screenstyle"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "style 'screenstyle' (from --style) is not a style of the benchmark" in err[0]
    assert "['grey', 'halftone', 'shading', 'sketch']" in err[0] and "Traceback" not in err[0]
    assert cli(["--pred", str(pred), "--truth", str(bench), "--style", "screenstyle", "--debug"]) == 1
    debug = capsys.readouterr().err  # --debug: the traceback, then the same line
    assert "Traceback" in debug and debug.strip().splitlines()[-1] == err[0]
    assert cli(["--pred", str(tmp_path / "absent"), "--truth", str(bench)]) == 1
    expected = f"python -m jobs.evaluate: error: --pred {tmp_path / 'absent'}: no such folder"
    assert capsys.readouterr().err.strip() == expected
    unfinished = tmp_path / "unfinished"
    shutil.copytree(bench, unfinished, ignore=shutil.ignore_patterns("benchmark.json"))
    assert cli(["--pred", str(pred), "--truth", str(unfinished)]) == 1
    assert "no benchmark.json; the benchmark folder is incomplete" in capsys.readouterr().err


def test_no_prediction_at_all_exits_1_with_one_line(bench: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "empty"
    pred.mkdir()
    assert cli(["--pred", str(pred), "--truth", str(bench), "--fid-features", FID]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # the error alone, not a summary of nulls before it
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("python -m jobs.evaluate: error: no page scored (8 failed; first: no prediction ")
    summary = json.loads((pred / "evaluate" / "evaluate.summary.json").read_text())
    assert summary["complete"] is False and summary["overall"]["psnr"] is None
    assert "style unknown" in summary["notes"][2]
    assert summary["metrics"]["skipped"]["fid"] == "fewer than 2 scored pages"


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    for argv in (
        ["--pred", "p", "--truth", "t", "--aesthetic-predictor", "head.pth"],
        ["--pred", "p", "--truth", "t", "--inception-weights", "w.pth", "--fid-features", "weightfree"],
        ["--pred", "p", "--truth", "t", "--resize", "cubic"],
    ):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "(see --help)" in err  # one line, no usage block


def test_plain_folder_mirrors_relative_paths(tmp_path: Path, capsys) -> None:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for name in ("a/p1.jpg", "a/p2.jpg", "b/p3.png"):
        image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
        (truth / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(truth / name)
        (pred / name).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(truth / name) as decoded:
            decoded.convert("RGB").save((pred / name).with_suffix(".png"))
    shutil.copy(pred / "b" / "p3.png", pred / "b" / "p4.png")  # no ground truth: listed, ignored
    argv = ["--pred", str(pred), "--truth", str(truth), "--style", "screenstyle", "--grid-pages", "1", "--fid-features"]
    assert cli([*argv, FID]) == 0
    summary = json.loads((pred / "evaluate" / "evaluate.summary.json").read_text())
    assert summary["overall"]["fid"] == 0.0 and summary["chapters"]["a"]["fid"] is None  # no --fid-per-chapter
    assert any(note.startswith("FID per chapter not computed") for note in summary["notes"])
    assert summary["truth_kind"] == "folder" and summary["scored"] == 3
    assert sorted(summary["chapters"]) == ["a", "b"] and summary["chapters"]["a"]["pages"] == 2
    assert summary["paper_row"] == "paper: ColorFlow, screenstyle"
    assert "chosen by the style name alone" in summary["notes"][2]
    assert summary["extra_predictions"] == ["b/p4.png"]
    assert all(row["psnr"] == "inf" for row in read_csv(pred / "evaluate" / "per_page.csv"))
