"""The shipped recipes (configs/) and the options of a real run: arguments files and accelerate configs parse, the
base configs train a step, 8-bit AdamW, EMA (kept, resumed exactly over two processes, exported), and one run
over two data roots of two frame sizes (batches of one size, exact resume)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.tiny import build_tiny_sd15
from training import train_gsrp, train_icp
from training.data import ICPDataConfig, build_icp_dataset, resolve_shard_source
from training.optimization import init_weights_kind

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
pytestmark = pytest.mark.usefixtures("frugal_threads")
REQUIRED = ["--pretrained_model_name_or_path", "SD15", "--data", "DATA", "--output_dir", "OUT"]
ICP_SMALL = [
    "--resolution", "64x96", "--train_batch_size", "2", "--mixed_precision", "no", "--dataloader_num_workers", "0",
    "--validation_steps", "0", "--report_to", "none", "--lora_rank", "4", "--lora_alpha", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15") / "tiny-sd15")


@pytest.fixture(scope="module")
def smaller_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second data root like `pipeline_data` at another frame size (96x144)."""
    from conftest import PIPELINE_ARGS

    from jobs.pipeline import main as pipeline_main

    args = list(PIPELINE_ARGS)
    args[args.index("--size") + 1] = "96x144"
    root = tmp_path_factory.mktemp("pipeline96")
    pipeline_main(["--generate-sample", str(root / "corpus"), "--output", str(root / "data"), *args])
    return root / "data"


def _parsed(parse, path: Path) -> object:
    return parse([f"@{path.relative_to(REPO)}", *REQUIRED])


def test_every_shipped_arguments_file_parses_with_its_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the files include each other by repository-relative paths, as documented
    icp = {path.stem: _parsed(train_icp.parse_args, path) for path in sorted((CONFIGS / "icp").glob("*.args"))}
    gsrp = {path.stem: _parsed(train_gsrp.parse_args, path) for path in sorted((CONFIGS / "gsrp").glob("*.args"))}
    assert len(icp) + len(gsrp) == len(list(CONFIGS.rglob("*.args")))  # no file left unchecked
    paper = icp["paper"]
    assert (paper.max_train_steps, paper.learning_rate, paper.resolution) == (150_000, 1e-5, (512, 800))
    assert (paper.lora_rank, paper.lora_alpha, paper.timestep_mu, paper.prompt) == (64, 64.0, 1.5, "manga")
    assert [icp[f"ablation-mu{mu}"].timestep_mu for mu in (0, 3)] == [0.0, 3.0]
    assert [icp[f"ablation-rank{r}"].lora_rank for r in (32, 128, 192)] == [32, 128, 192]
    for name, args in icp.items():  # every variant keeps the recipe's global batch (the documented assumption)
        assert args.train_batch_size * args.gradient_accumulation_steps == 8, name
        assert (args.max_train_steps, args.learning_rate) == (150_000, 1e-5), name
    small = icp["memory-24gb"]
    assert small.use_8bit_adam and small.free_text_encoder and small.gradient_checkpointing
    assert not paper.use_8bit_adam and not paper.use_ema  # plain AdamW stays the default
    assert (gsrp["paper"].max_train_steps, gsrp["paper"].learning_rate) == (30_000, 1e-5)
    assert gsrp["memory-24gb"].use_8bit_adam
    assert all(a.train_batch_size * a.gradient_accumulation_steps == 4 for a in gsrp.values())
    overridden = train_icp.parse_args(["@configs/icp/paper.args", *REQUIRED, "--timestep_mu", "2"])
    assert overridden.timestep_mu == 2.0  # arguments after the file override it


def test_every_accelerate_config_loads_with_accelerates_loader() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in sorted((CONFIGS / "accelerate").glob("*"))}
    assert sorted(configs) == ["1gpu", "2nodes-8gpu", "8gpu"]
    shapes = {name: (c.num_machines, c.num_processes, c.distributed_type.value) for name, c in configs.items()}
    assert shapes["1gpu"][:2] == (1, 1) and shapes["8gpu"] == (1, 8, "MULTI_GPU")
    assert shapes["2nodes-8gpu"] == (2, 16, "MULTI_GPU") and configs["2nodes-8gpu"].main_process_port == 29500
    assert all(getattr(c.mixed_precision, "value", c.mixed_precision) == "bf16" for c in configs.values())


def test_the_base_icp_config_trains_a_step(sd15: Path, pipeline_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    argv = ["@configs/icp/paper.args", "--pretrained_model_name_or_path", str(sd15), "--data", str(pipeline_data)]
    argv += ["--output_dir", str(tmp_path / "icp"), "--max_train_steps", "1", "--mixed_precision", "no"]
    argv += ["--resolution", "64x96", "--dataloader_num_workers", "0", "--report_to", "none"]
    summary = train_icp.main(train_icp.parse_args(argv))
    export = json.loads((tmp_path / "icp" / "export.json").read_text())
    assert summary["steps"] == 1 and summary["samples"] == 8  # the recipe's 8 per device
    assert export["timestep_mu"] == 1.5 and export["lora"]["rank"] == 64 and export["weights"] == "raw"


def test_the_base_gsrp_config_trains_a_step_with_ema(sd15: Path, pipeline_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["@configs/gsrp/paper.args", "--pretrained_model_name_or_path", str(sd15), "--data", str(pipeline_data)]
    argv += ["--output_dir", str(tmp_path / "gsrp"), "--max_train_steps", "2", "--mixed_precision", "no"]
    argv += ["--crop_size", "64x64", "--dataloader_num_workers", "0", "--report_to", "none", "--learning_rate", "1e-2"]
    argv += ["--use_ema", "--ema_decay", "0.5", "--num_validation_images", "1"]
    summary = train_gsrp.main(train_gsrp.parse_args(argv))
    export = Path(summary["export"])
    assert summary["global_step"] == 2 and Path(summary["ema_export"]) == export / "ema"
    raw = load_file(export / "fusion" / "diffusion_pytorch_model.safetensors")
    averaged = load_file(export / "ema" / "fusion" / "diffusion_pytorch_model.safetensors")
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # the EMA lags the raw weights
    assert init_weights_kind(str(export / "ema")) == "ema" and init_weights_kind(str(tmp_path / "gsrp")) == "raw"


def test_8bit_adam_is_refused_in_one_line_without_bitsandbytes(
    sd15: Path, pipeline_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it fails, as where it is not installed
    argv = ["--pretrained_model_name_or_path", str(sd15), "--data", str(pipeline_data)]
    status = train_icp.cli([*argv, "--output_dir", str(tmp_path / "run"), *ICP_SMALL, "--use_8bit_adam"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "--use_8bit_adam needs bitsandbytes" in err[-1] and "pip install" in err[-1]
    assert not (tmp_path / "run").exists()


def test_8bit_adam_follows_adamw_with_8_bit_states() -> None:
    """The trainers' optimizer with --use_8bit_adam is bitsandbytes' AdamW8bit (the optional bnb extra; it runs on
    CPU), which tracks torch's AdamW closely on a small regression with 8-bit moments. `make test` installs
    bitsandbytes into a folder of its own (.venv/bnb), not the venv, and this runs it there in a subprocess: where peft
    can import bitsandbytes, every peft import loads it and prints a kernel-hub warning. Where the extra is installed
    in the environment (`pip install -e ".[bnb]"`), that is used."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    makefile = re.search(r"^BNB_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert makefile and extras["bnb"] == [makefile[1]]  # make test installs the version the extra names
    beside = Path(sys.prefix) / "bnb"
    if importlib.util.find_spec("bitsandbytes") is None and not (beside / "bitsandbytes").is_dir():
        pytest.skip(f"bitsandbytes is neither installed nor in {beside} (make test puts it there)")
    path = os.pathsep.join([str(beside), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "adam8bit_numerics.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert result["difference"] < 0.05 * result["adamw_moved"] and result["adamw_moved"] > 0
    assert result["state_dtypes"] == ["torch.float32", "torch.uint8"]
    assert "kernels-community" not in done.stderr  # importing `model` quiets the kernel-hub warning


def _launch(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*command, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _export_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_two_processes_with_ema_resume_exactly(sd15: Path, pipeline_data: Path, tmp_path: Path) -> None:
    """Two gloo ranks, EMA on: stopped at step 2 and resumed, the run ends with the raw and the EMA weights of an
    uninterrupted run, bit for bit; the EMA export sits beside the raw one and differs from it."""
    common = ["--pretrained_model_name_or_path", str(sd15), "--data", str(pipeline_data), *ICP_SMALL]
    common += ["--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema", "--ema_decay", "0.5"]
    common += ["--learning_rate", "5e-3"]
    launch = ["--multi_gpu", "--num_processes", "2", "-m", "training.train_icp"]
    _launch(*launch, *common, "--output_dir", str(tmp_path / "whole"))
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    _launch(*launch, *common, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest")
    whole, cut = (json.loads((tmp_path / n / "train_icp.summary.json").read_text()) for n in ("whole", "cut"))
    assert cut["loss_steps"] == [3, 4] and cut["world_size"] == 2
    assert whole["trainable_sha256_per_rank"] == cut["trainable_sha256_per_rank"]
    assert whole["ema_sha256_per_rank"] == cut["ema_sha256_per_rank"]
    assert len(set(whole["ema_sha256_per_rank"])) == 1  # both ranks hold the same EMA
    assert _export_files(tmp_path / "whole" / "ema") == _export_files(tmp_path / "cut" / "ema")
    assert _export_files(tmp_path / "whole" / "ema") != _export_files(tmp_path / "whole")  # raw != EMA
    assert (tmp_path / "whole" / "checkpoint-4" / "custom_checkpoint_0.pkl").is_file()  # the EMA's state
    assert json.loads((tmp_path / "whole" / "ema" / "export.json").read_text())["weights"] == "ema"


def test_two_data_roots_of_two_sizes_batch_by_size_and_resume_exactly(
    sd15: Path, pipeline_data: Path, smaller_data: Path, tmp_path: Path
) -> None:
    source = resolve_shard_source([str(pipeline_data), str(smaller_data)])
    assert source.frame_sizes == ((96, 144), (128, 192)) and source.mixes_sizes
    config = ICPDataConfig(resolution=(96, 144), batch_size=2, shuffle_shards=2)
    stream = iter(build_icp_dataset(source, config, seed=0, rank=1, world_size=2))
    batches = [[next(stream) for _ in range(2)] for _ in range(10)]
    shapes = [{tuple(sample["c_color"].shape) for sample in batch} for batch in batches]
    assert all(len(shape) == 1 for shape in shapes)  # a batch holds one size
    # the 128x192 frames train capped at 96x144, the 96x144 ones at their own size: crops scale with the frame
    assert {next(iter(shape)) for shape in shapes} == {(3, 144, 96)}
    sizes = {tuple(sample["crop"][2:] - sample["crop"][:2]) for batch in batches for sample in batch}
    assert max(w for w, _ in sizes) > 192 and min(w for w, _ in sizes) <= 192  # windows of both frame sizes

    common = ["--pretrained_model_name_or_path", str(sd15), "--data", str(pipeline_data), str(smaller_data)]
    common += [*ICP_SMALL, "--resolution", "128x192", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    common += ["--record_sample_keys"]
    whole = train_icp.main(train_icp.parse_args([*common, "--output_dir", str(tmp_path / "whole")]))
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = train_icp.main(
        train_icp.parse_args([*common, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    )
    assert whole["trainable_sha256_per_rank"] == resumed["trainable_sha256_per_rank"]
    assert whole["sample_keys_per_rank"][0][2:] == resumed["sample_keys_per_rank"][0]
    export = json.loads((tmp_path / "whole" / "export.json").read_text())
    assert export["frame_sizes"] == [[96, 144], [128, 192]] and export["resolution"] == [128, 192]
