"""The data jobs as a newcomer meets them: --help, one-line errors with honest exit codes, preconditions checked
before Ray starts, no empty output folder left behind, the offline encoder, a torch-free screentone.augment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jobs import ingest, inspect_retrieval, pipeline, retrieval, screentone, shards
from pipelines.core.cli import DefaultsHelpFormatter, run_job

REPO = Path(__file__).resolve().parents[1]
JOBS = (ingest, retrieval, screentone, shards, pipeline, inspect_retrieval)
LAYOUT = "expected <series>/<chapter>/<pages> or <series>/<chapter>.cbz|.zip"


def _run(job, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """The job's command line in-process: exit status and the lines it wrote to stderr."""
    code = run_job(job.main, argv, prog=job.PROG)
    return code, capsys.readouterr().err.splitlines()


def _subprocess(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


# ---- --help ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", JOBS, ids=lambda job: job.PROG.split(".")[-1])
def test_every_flag_is_described_and_shows_its_default(job) -> None:
    parser = job.build_parser()
    formatter = DefaultsHelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{job.PROG} {name} has no description"
        shown = formatter._get_help_string(action) % {"default": action.default}
        if action.option_strings and action.nargs != 0 and not action.required and "required" not in action.help:
            assert "default" in shown.lower(), f"{job.PROG} {name}: --help does not show its default"
        assert "(default: None)" not in shown, f"{job.PROG} {name}: say what no value means"
    assert "--debug" in parser.format_help()


def test_help_names_the_default_encoder_and_its_weights() -> None:
    for job in (retrieval, pipeline):
        parser = job.build_parser()
        text = next(a.help for a in parser._actions if "--encoder" in a.option_strings)
        assert "Default open_clip:ViT-H-14:laion2b_s32b_b79k" in text and "needs its weights" in text
        assert "'weightfree' (offline, no weights)" in text and "open_clip:ViT-H-14:/path/to/" in text
        assert "needs its weights" in " ".join(parser.format_help().split())


# ---- one-line errors ---------------------------------------------------------------------------------------------


def test_a_missing_input_is_one_line_and_leaves_no_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    done = _subprocess(["-m", "jobs.ingest", "--input", str(tmp_path / "nope"), "--output", str(out), "--local"])
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"python -m jobs.ingest: error: --input {tmp_path / 'nope'}: no such folder"]
    assert not (tmp_path / "new").exists()
    debug = _subprocess(["-m", "jobs.ingest", "--input", str(tmp_path / "nope"), "--output", str(out), "--debug"])
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1].endswith("no such folder")


def test_usage_errors_exit_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(ingest, ["--input", "x"], capsys)
    assert code == 2 and err == ["python -m jobs.ingest: error: the following arguments are required: --output "
                                 "(see --help)"]  # fmt: skip
    code, err = _run(retrieval, ["--data", "x", "--size", "12by3"], capsys)
    assert code == 2 and len(err) == 1 and "is not WIDTHxHEIGHT" in err[0]
    code, err = _run(retrieval, ["--data", "x", "--max-per-page", "0"], capsys)
    assert code == 2 and len(err) == 1 and "0 is not a positive integer" in err[0]
    code, err = _run(inspect_retrieval, ["--data", "x", "--random", "2", "--out", "a.png"], capsys)
    assert code == 2 and len(err) == 1 and "--out names one file" in err[0]


def test_an_output_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in" / "s" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "s" / "c" / "1.png")
    (tmp_path / "file").write_text("x")
    code, err = _run(ingest, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "file"), "--local"], capsys)
    assert code == 1 and err == [f"python -m jobs.ingest: error: --output {tmp_path / 'file'}: is a file, expected a "
                                 "folder (existing or to create)"]  # fmt: skip
    code, err = _run(
        ingest, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "file" / "sub"), "--local"], capsys
    )
    assert code == 1 and len(err) == 1 and "cannot create it" in err[0]


@pytest.mark.parametrize("shape", ["empty", "flat", "series_of_pages", "input_is_a_file"])
def test_inputs_without_the_chapter_layout_are_refused(
    shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    if shape == "flat":
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / f"{i}.png")
    elif shape == "series_of_pages":
        (root / "series").mkdir()
        Image.new("RGB", (8, 8)).save(root / "series" / "001.png")
    elif shape == "input_is_a_file":
        root.rmdir()
        root.write_text("x")
    out = tmp_path / "out"
    for job in (ingest, pipeline):
        argv = ["--input", str(root), "--output", str(out), "--local"]
        code, err = _run(job, argv + (["--encoder", "weightfree"] if job is pipeline else []), capsys)
        assert code == 1 and len(err) == 1, err
        expected = {
            "empty": f"--input {root}: the folder is empty; {LAYOUT}",
            "flat": f"--input {root}: holds 3 image files at its top level (e.g. 0.png) but no chapters; {LAYOUT}",
            "series_of_pages": f"--input {root}: series folders hold images directly (e.g. series/001.png), not "
            f"chapter folders; {LAYOUT}",
            "input_is_a_file": f"--input {root}: is a file, expected the folder holding <series>/<chapter>",
        }[shape]
        assert err[0] == f"{job.PROG}: error: {expected}"
        assert not out.exists()


def test_stages_run_before_their_predecessor_fail_at_once_without_starting_ray(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    script = (
        "import sys, ray\n"
        "from pipelines.core.cli import run_job\n"
        "from jobs import retrieval, screentone, shards, inspect_retrieval\n"
        "data = sys.argv[1]\n"
        "for job, argv in ((retrieval, ['--encoder', 'weightfree']), (screentone, []), (shards, []),\n"
        "                  (inspect_retrieval, ['--frame', 'f'])):\n"
        "    code = run_job(job.main, ['--data', data, *argv], prog=job.PROG)\n"
        "    print(code, ray.is_initialized())\n"
    )
    done = _subprocess(["-c", script, str(data)])
    assert done.stdout.split() == ["1", "False"] * 4, done.stderr
    assert done.stderr.splitlines() == [
        f"python -m jobs.retrieval: error: retrieval needs a finished ingest stage in {data} (no ingest.summary.json)"
        f": run python -m jobs.ingest --input ROOT --output {data}",
        f"python -m jobs.screentone: error: screentone needs a finished ingest stage in {data} (no "
        f"ingest.summary.json): run python -m jobs.ingest --input ROOT --output {data}",
        f"python -m jobs.shards: error: shards needs a finished ingest stage in {data} (no ingest.summary.json): "
        f"run python -m jobs.ingest --input ROOT --output {data}",
        f"python -m jobs.inspect_retrieval: error: inspect_retrieval needs a finished retrieval stage in {data} (no "
        f"retrieval.summary.json): run python -m jobs.retrieval --data {data}",
    ]


def test_shards_needs_the_screentone_stage_and_a_missing_data_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for stage in ("ingest", "retrieval"):
        (data / f"{stage}.summary.json").write_text(json.dumps({"complete": True}))
    code, err = _run(shards, ["--data", str(data), "--local"], capsys)
    assert code == 1 and err == [
        f"python -m jobs.shards: error: shards needs a finished screentone stage in {data} (no "
        f"screentone.summary.json): run python -m jobs.screentone --data {data}"
    ]
    (data / "retrieval.summary.json").write_text(json.dumps({"complete": False}))
    code, err = _run(shards, ["--data", str(data), "--local"], capsys)
    assert code == 1 and "reports failed units" in err[0]
    code, err = _run(screentone, ["--data", str(tmp_path / "missing"), "--local"], capsys)
    assert code == 1 and err == [
        f"python -m jobs.screentone: error: --data {tmp_path / 'missing'}: no such folder; run python -m jobs.ingest "
        "--input ROOT --output OUT first"
    ]


def test_inspect_retrieval_names_an_unknown_frame_in_one_line(
    pipeline_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(
        inspect_retrieval, ["--data", str(pipeline_data), "--frame", "nope", "--out-dir", str(tmp_path)], capsys
    )
    assert code == 1 and len(err) == 1
    assert err[0].startswith(
        "python -m jobs.inspect_retrieval: error: frame 'nope' is not a frame of this retrieval run"
    )
    assert not list(tmp_path.iterdir())  # nothing drawn


# ---- the encoder's weights -----------------------------------------------------------------------------------------


def test_offline_default_encoder_is_one_line_naming_the_alternatives(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    cache.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "XDG_CACHE_HOME": str(cache)}
    done = _subprocess(["-m", "jobs.retrieval", "--data", str(tmp_path), "--local"], **env)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith("python -m jobs.retrieval: error: encoder open_clip:ViT-H-14:laion2b_s32b_b79k: its weights")
    assert (
        "--encoder weightfree" in line and "--encoder open_clip:ViT-H-14:/path/to/open_clip_pytorch_model.bin" in line
    )
    out = tmp_path / "out"
    done = _subprocess(["-m", "jobs.pipeline", "--generate-sample", str(tmp_path / "c"), "--output", str(out)], **env)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "--encoder weightfree" in done.stderr
    assert not out.exists() and not (tmp_path / "c").exists()  # checked before the corpus is generated


def test_weights_in_the_hub_cache_satisfy_the_precondition(tmp_path: Path) -> None:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/<file>), as hf_hub_download leaves it."""
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    weights = repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in: only its presence is checked before the job starts")
    script = (
        "from pipelines.core.encoders import DEFAULT_ENCODER, ensure_encoder_weights, resolve_encoder\n"
        "print(ensure_encoder_weights(resolve_encoder(DEFAULT_ENCODER)))\n"
    )
    done = _subprocess(["-c", script], HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(weights)


# ---- imports -------------------------------------------------------------------------------------------------------


def test_importing_screentone_augment_does_not_import_torch() -> None:
    script = (
        "import sys\n"
        "import screentone.augment, pipelines.core.samples\n"
        "print('torch' in sys.modules)\n"
        "from screentone import blend, make_renderer\n"
        "print('torch' in sys.modules)\n"
    )
    done = _subprocess(["-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]  # the package's names still work, loading torch on demand


def test_exit_status_follows_the_summary_and_unexpected_errors_say_how_to_see_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_job(lambda argv: {"complete": False}, [], prog="job") == 1  # failed units: `ray job submit` FAILED
    assert capsys.readouterr().err.splitlines() == [
        "job: error: the run is incomplete (see its summary); rerun the same command to retry them (finished units "
        "are kept)"
    ]
    failed = {"complete": False, "failures": [{"key": "c1", "error": "task crashed on 4 attempts: NodeDiedError"}]}
    assert run_job(lambda argv: failed, [], prog="job") == 1
    assert capsys.readouterr().err.splitlines() == [
        "job: error: 1 unit failed: c1: task crashed on 4 attempts: NodeDiedError; rerun the same command to retry "
        "them (finished units are kept)"
    ]
    assert run_job(lambda argv: {"complete": True}, [], prog="job") == 0
    assert run_job(lambda argv: 1, [], prog="job") == 1 and run_job(lambda argv: ["a.png"], [], prog="job") == 0

    def broken(argv):
        raise ZeroDivisionError("division by zero")

    assert run_job(broken, [], prog="job") == 1
    assert capsys.readouterr().err.splitlines() == [
        "job: error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)"
    ]


def test_an_os_error_names_its_path_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model.tiny_pixart import main as tiny_pixart_main

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert run_job(tiny_pixart_main, [str(blocked / "tiny")], prog="python -m model.tiny_pixart") == 1
    assert capsys.readouterr().err.splitlines() == [f"python -m model.tiny_pixart: error: {blocked}: File exists"]


def test_what_a_job_started_is_ended_before_its_last_line(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A Ray session keeps forwarding its raylets' logs (a full disk, say) until it ends: `init_ray` registers its
    end with `at_job_end`, and `run_job` runs those hooks, on success and on failure, before the job's last line."""
    from pipelines.core.cli import at_job_end

    def chatter() -> None:
        print("(raylet) file_system_monitor: disk over 95% full", file=sys.stderr)

    def incomplete(argv):
        at_job_end(chatter)
        at_job_end(chatter)  # registered once
        return {"complete": False}

    def crashing(argv):
        at_job_end(chatter)
        raise RuntimeError("no such folder")

    assert run_job(incomplete, [], prog="job") == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("(raylet)") and len(lines) == 2 and lines[1].startswith("job: error: the run is")
    assert run_job(crashing, [], prog="job") == 1
    assert capsys.readouterr().err.splitlines()[1:] == ["job: error: no such folder"]

    def failing_end() -> None:
        raise RuntimeError("the session was already gone")

    def done_despite_a_failing_hook(argv):
        at_job_end(failing_end)
        return {"complete": True}

    with caplog.at_level(logging.WARNING, logger="pipelines.core.cli"):
        assert run_job(done_despite_a_failing_hook, [], prog="job") == 0  # the job's outcome stands
    assert "failing_end failed: the session was already gone" in caplog.text
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("job:")]
    at_job_end(chatter)  # outside a job: the caller owns what it started, nothing runs later
    assert run_job(lambda argv: {"complete": True}, [], prog="job") == 0
    assert capsys.readouterr().err == ""
