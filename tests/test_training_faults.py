"""The trainers as a user meets them with damaged inputs and faults: refused before any model loads, one line that
names the file, no output folder left behind, a lock per output folder, readable checkpoints only, a budget of
skipped samples, byte-reproducible exports, and a clean stop on SIGTERM.

In-process on the `pipeline_data` shards (copied, then damaged per case) and a tiny SD1.5 folder; subprocesses
only where the process boundary is the point (SIGTERM under a 2-process launch, accelerate's traceback order).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from model.tiny import build_tiny_sd15
from training import train_gsrp, train_icp
from training.run_lock import LOCK_NAME, _take_over

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("frugal_threads")
ICP_FAST = [
    "--train_batch_size", "2", "--resolution", "64x96", "--dataloader_num_workers", "0", "--validation_steps", "0",
    "--report_to", "none", "--lora_rank", "4", "--lora_alpha", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "tiny-sd15")


@pytest.fixture
def data_copy(pipeline_data: Path, tmp_path: Path) -> Path:
    """A data root holding a copy of the fixture's shards (and their manifests), to damage."""
    root = tmp_path / "data"
    shutil.copytree(pipeline_data / "shards", root / "shards")
    return root


def icp_args(sd15: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(sd15), "--data", str(data), "--output_dir", str(out), *ICP_FAST,
            *extra]  # fmt: skip


def gsrp_args(sd15: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(sd15), "--data", str(data), "--output_dir", str(out),
            "--crop_size", "32x32", "--bw_variant", "grey", "--report_to", "none", "--num_validation_images", "0",
            *extra]  # fmt: skip


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_damaged_inputs_are_refused_before_any_model_loads(
    sd15: Path, data_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "run"
    tar = data_copy / "shards" / "train" / "train-g0000-000000.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 3])  # a partial copy: the manifest records the whole size
    for trainer, argv in ((train_icp, icp_args), (train_gsrp, gsrp_args)):
        assert trainer.cli(argv(sd15, data_copy, out)) == 1
        line = one_line(capsys)
        assert line.startswith(f"{trainer.PROG}: error: shard {tar}: truncated: {len(whole) // 3} bytes"), line
    assert not (tmp_path / "new").exists()

    bare = tmp_path / "bare.tar"  # no manifest: the tar headers show the cut
    bare.write_bytes(whole[: len(whole) // 3])
    assert train_icp.cli(icp_args(sd15, bare, out)) == 1
    assert "truncated" in one_line(capsys)

    tar.write_bytes(whole)
    assert train_icp.cli(icp_args(sd15, data_copy, out, "--resolution", "256x384")) == 2
    assert "--resolution 256x384 is larger than the data's frames (128x192" in one_line(capsys)
    assert train_icp.cli(icp_args(tmp_path / "no" / "sd15", data_copy, out)) == 2
    assert f"--pretrained_model_name_or_path {tmp_path / 'no' / 'sd15'}: no such folder" in one_line(capsys)
    partial = tmp_path / "partial-sd15"
    shutil.copytree(sd15, partial, ignore=shutil.ignore_patterns("unet"))
    assert train_icp.cli(icp_args(partial, data_copy, out)) == 2
    assert one_line(capsys).endswith("not a diffusers Stable Diffusion folder: it has no unet")
    assert train_gsrp.cli(gsrp_args(sd15, data_copy, out, "--crop_size", "4x4")) == 2
    assert "must be multiples of 8" in one_line(capsys)
    assert train_icp.cli(icp_args(sd15, data_copy, out, "--resume_from_checkpoint", str(tmp_path / "x"))) == 1
    assert "not a complete checkpoint" in one_line(capsys)
    assert not (tmp_path / "new").exists()


def test_corrupt_checkpoints_locks_and_byte_reproducible_exports(
    sd15: Path, data_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = tmp_path / "straight"
    train_icp.main(train_icp.parse_args(icp_args(sd15, data_copy, straight, "--max_train_steps", "2",
                                                  "--checkpointing_steps", "1")))  # fmt: skip
    assert not (straight / LOCK_NAME).exists()  # released at the end
    capsys.readouterr()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for step in (1, 2):
        shutil.copytree(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    optimizer = resumed / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:200])  # a checkpoint cut by a full disk
    argv = icp_args(sd15, data_copy, resumed, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert train_icp.cli(argv) == 1
    line = one_line(capsys)
    assert f"unreadable checkpoint: {optimizer}: not a complete torch archive" in line
    assert "the newest readable one is checkpoint-1; rerun with --skip_unreadable_checkpoints" in line

    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "another train_icp"}
    (resumed / LOCK_NAME).write_text(json.dumps(holder))  # a live run on this host holds the folder
    assert train_icp.cli([*argv, "--skip_unreadable_checkpoints"]) == 1
    line = one_line(capsys)
    assert f"is in use by another training run (pid {os.getpid()} on {holder['host']}" in line
    assert "another train_icp" in line and "--force_unlock" in line

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (resumed / LOCK_NAME).write_text(json.dumps({**holder, "pid": int(finished.stdout)}))  # its process is gone
    summary = train_icp.main(train_icp.parse_args([*argv, "--skip_unreadable_checkpoints"]))
    assert summary["loss_steps"] == [2, 2]  # the losses of a resumed run cover its own steps
    lora = Path("unet_lora") / "pytorch_lora_weights.safetensors"
    assert (resumed / lora).read_bytes() == (straight / lora).read_bytes()  # byte-reproducible, not only equal
    guider = Path("colorguider") / "diffusion_pytorch_model.safetensors"
    assert (resumed / guider).read_bytes() == (straight / guider).read_bytes()


def test_lora_metadata_is_written_in_sorted_order(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from model.lora import add_icp_lora, save_icp_lora
    from model.tiny import build_tiny_unet

    unet: UNet2DConditionModel = build_tiny_unet()
    add_icp_lora(unet, rank=2, alpha=2)
    files = [save_icp_lora(unet, tmp_path / str(i)).read_bytes() for i in range(4)]
    assert all(data == files[0] for data in files)
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_a_shard_with_damaged_samples_stops_training_naming_the_reason(
    sd15: Path, data_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same size, garbled bytes (the size check cannot see it): the skipped fraction stops the run in one line."""
    from training.data import resolve_shard_source

    tar = Path(resolve_shard_source(data_copy).urls[0])
    with tarfile.open(tar) as archive:
        offsets = [member.offset_data for member in archive if member.name.endswith(".json")][:2]
    data = bytearray(tar.read_bytes())
    for offset in offsets:  # two samples' metadata: garbage instead of JSON
        data[offset : offset + 2] = b"\xff\xfe"
    tar.write_bytes(bytes(data))
    code = train_gsrp.cli(gsrp_args(sd15, tar, tmp_path / "run", "--max_train_steps", "12"))
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train_gsrp: error: ") and "samples read were skipped (more than --max_bad_fraction" in line
    assert f"first: {tar} sample" in line


def _lock_holder_line(stderr: str, prog: str) -> int:
    lines = stderr.splitlines()
    return next(i for i, line in enumerate(lines) if line.startswith(f"{prog}: "))


def test_accelerate_launch_shows_the_trainers_line_before_its_own_traceback(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "pytest"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train_gsrp",
               *gsrp_args(sd15, pipeline_data, out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ours = _lock_holder_line(done.stderr, "train_gsrp")
    assert "is in use by another training run" in done.stderr.splitlines()[ours]
    assert all("Traceback" not in line for line in done.stderr.splitlines()[:ours])


def test_sigterm_saves_a_checkpoint_on_every_rank_and_says_how_to_resume(
    sd15: Path, pipeline_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train_icp",
               *icp_args(sd15, pipeline_data, out, "--max_train_steps", "10000", "--checkpointing_steps", "1",
                         "--checkpoints_total_limit", "1")]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[1][-3000:]
        os.killpg(process.pid, signal.SIGTERM)  # as a scheduler preempts a job: every process of it
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.startswith("train_icp: preempted at step ")]
    assert len(lines) == 1, stderr[-3000:]  # printed once, by the main process
    step = int(lines[0].split("step ")[1].split(":")[0])
    assert "rerun the same command with --resume_from_checkpoint latest" in lines[0]
    checkpoint = out / f"checkpoint-{step}"
    assert json.loads((checkpoint / "train_state.json").read_text())["global_step"] == step < 10000
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not (out / LOCK_NAME).exists() and not (out / "train_icp.summary.json").exists()
    assert torch.load(checkpoint / "optimizer.bin", weights_only=False)  # whole, not cut by the stop


def test_a_stale_lock_is_taken_over_only_while_it_is_still_the_one_judged_stale(tmp_path: Path) -> None:
    from training.run_lock import acquire_run_lock, release_run_lock

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(finished.stdout), "started": "then", "command": "old run"}
    fresh = {**stale, "pid": os.getpid(), "started": "now", "command": "the run that took it over first"}
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps(fresh))  # another run replaced the stale lock after we read it
    assert _take_over(path, stale) is False
    assert json.loads(path.read_text()) == fresh and sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    path.write_text(json.dumps(stale))
    assert _take_over(path, stale) is True and not path.exists()
    path.write_text(json.dumps(stale))
    lock = acquire_run_lock(tmp_path)  # a stale lock on this host is taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_lock(lock)
    assert not lock.exists()
