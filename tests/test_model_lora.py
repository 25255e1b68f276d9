"""The ICP LoRA: released key layout, both released spellings, strictness, diffusers-readable saves."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from model.lora import ICP_LORA_TARGETS, add_icp_lora, load_icp_lora, lora_settings, save_icp_lora
from model.tiny import build_tiny_unet

REFERENCE = Path(__file__).parent / "reference" / "colorflow_lora_keys.json"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return build_tiny_unet().eval()


@pytest.fixture(scope="module")
def trained(base_unet):
    """A LoRA-injected copy whose B matrices are non-zero (gaussian init leaves them zero)."""
    unet = add_icp_lora(copy.deepcopy(base_unet), rank=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return unet


def _predict(unet):
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 7, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, 500, text).sample


def _released_state(unet, prefix="", adapter=True):
    state = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            name = key if adapter else key.replace(".default.weight", ".weight")
            state[prefix + name] = value.clone()
    return state


def test_sd15_lora_matches_the_released_key_listing():
    reference = json.loads(REFERENCE.read_text())
    with torch.device("meta"):
        unet = add_icp_lora(UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
    keys = {key: list(value.shape) for key, value in unet.state_dict().items() if ".lora_" in key}
    assert keys == reference["keys"]
    assert sorted(ICP_LORA_TARGETS) == sorted(reference["target_modules"])
    assert lora_settings(unet) == {"rank": 64, "alpha": 64.0, "targets": sorted(ICP_LORA_TARGETS)}


def test_only_lora_parameters_train_and_a_second_adapter_is_refused(base_unet):
    unet = add_icp_lora(copy.deepcopy(base_unet))
    trainable = [name for name, parameter in unet.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # gaussian init: A random, B zero, so a fresh LoRA changes nothing
    assert torch.equal(_predict(unet), _predict(base_unet))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_icp_lora(unet)


def test_save_is_diffusers_readable_and_round_trips(tmp_path, base_unet, trained):
    path = save_icp_lora(trained, tmp_path / "unet_lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    expected = _predict(trained)
    assert not torch.allclose(expected, _predict(base_unet))

    ours = load_icp_lora(copy.deepcopy(base_unet), path)
    assert lora_settings(ours)["alpha"] == 8.0 and lora_settings(ours)["rank"] == 4
    assert torch.allclose(_predict(ours), expected, atol=1e-6)

    state, _, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path / "unet_lora", return_lora_metadata=True)
    assert all(key.startswith("unet.") for key in state)
    theirs = copy.deepcopy(base_unet)
    theirs.load_lora_adapter(state, prefix="unet", metadata=metadata, adapter_name="icp")
    assert torch.allclose(_predict(theirs), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("prefix", "adapter"),
    [("", True), ("", False), ("unet.", False), ("unet.", True), ("base_model.model.", True)],
)
def test_released_spellings_load(tmp_path, base_unet, trained, prefix, adapter):
    torch.save(_released_state(trained, prefix, adapter), tmp_path / "unet_lora.bin")
    # The release stores no alpha: it is r = alpha; our fixture's alpha is 2 x rank, so say so.
    loaded = load_icp_lora(copy.deepcopy(base_unet), tmp_path / "unet_lora.bin", alpha=8)
    assert torch.allclose(_predict(loaded), _predict(trained), atol=1e-6)
    # Into an already injected UNet too.
    injected = add_icp_lora(copy.deepcopy(base_unet), rank=4, alpha=8)
    assert torch.allclose(_predict(load_icp_lora(injected, tmp_path)), _predict(trained), atol=1e-6)


def test_foreign_or_missing_keys_fail_naming_them(tmp_path, base_unet, trained):
    state = _released_state(trained)
    foreign = {**state, "conv_in.weight": torch.zeros(16, 4, 3, 3)}
    torch.save(foreign, tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match=r"unexpected key 'conv_in\.weight'"):
        load_icp_lora(copy.deepcopy(base_unet), tmp_path / "foreign.bin")
    unknown_module = {
        **state,
        "up_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight": torch.zeros(4, 16),
    }
    torch.save(unknown_module, tmp_path / "unknown.bin")
    with pytest.raises(ValueError, match=r"unexpected key 'up_blocks\.9\.attentions"):
        load_icp_lora(copy.deepcopy(base_unet), tmp_path / "unknown.bin")
    wrong_key = next(key for key in state if ".lora_B." in key)
    torch.save({**state, wrong_key: torch.zeros(3, 4)}, tmp_path / "shape.bin")
    injected = add_icp_lora(copy.deepcopy(base_unet), rank=4, alpha=8)
    expected_name = wrong_key.replace(".default", "").replace(".", r"\.")
    with pytest.raises(ValueError, match=f"key '{expected_name}' has shape \\(3, 4\\)"):
        load_icp_lora(injected, tmp_path / "shape.bin")
    missing_key = next(iter(state))
    missing = {key: value for key, value in state.items() if key != missing_key}
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="missing key '" + missing_key.replace(".default", "").replace(".", r"\.")):
        load_icp_lora(copy.deepcopy(base_unet), tmp_path / "missing.bin")
