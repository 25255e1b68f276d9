"""The metrics of jobs.evaluate on constructed pairs with known values, and the loaders of their networks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.metrics import (
    FeatureExtractor,
    frechet_distance,
    inception_features,
    load_aesthetic_head,
    resolve_fid_features,
)
from evaluation.reports import format_value, json_value, ranked
from evaluation.scoring import paper_style
from pipelines.core.image_metrics import ImageEmbedder, cosine, psnr, ssim

torch.set_num_threads(1)


class TinyExtractor(torch.nn.Module):
    """A seeded random conv net: uint8 (N, 3, H, W) -> 24 features (8 channels x (mean, std, max))."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(images.float() / 255.0))
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def tiny_extractor() -> torch.nn.Module:
    """The `--fid-features test_evaluate_metrics:tiny_extractor` factory the job imports."""
    return TinyExtractor()


def random_pages(count: int, seed: int, shift: float = 0.0, size: int = 48) -> list[np.ndarray]:
    """Random colour pages (6 x 6 blocks of colour plus noise, side a multiple of 6), brightened by `shift`."""
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(count):
        blocks = rng.uniform(30, 200, (6, 6, 3))
        page = np.kron(blocks, np.ones((size // 6, size // 6, 1)))
        page = page + rng.normal(0, 10, page.shape)
        pages.append(np.clip(np.round(page + shift), 0, 255).astype(np.uint8))
    return pages


def test_identical_images_have_infinite_psnr_and_ssim_one() -> None:
    page = random_pages(1, seed=1, size=60)[0]
    page[10:40, 5:50] = 250  # a flat area: SSIM in float32 would score it 0.999
    assert math.isinf(psnr(page, page)) and psnr(page, page) > 0
    assert ssim(page, page) == pytest.approx(1.0, abs=1e-9)
    assert ssim(page, page, "float32") == pytest.approx(1.0, abs=2e-3)  # the fast mode: close, not exact
    assert json_value(psnr(page, page)) == "inf" and format_value("psnr", psnr(page, page)) == "inf"


def test_gaussian_noise_of_sigma_5_on_mid_grey_gives_34_2_db() -> None:
    truth = np.full((256, 256, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).normal(0.0, 5.0, truth.shape)
    noisy = np.clip(np.round(128 + noise), 0, 255).astype(np.uint8)
    assert psnr(noisy, truth) == pytest.approx(34.2, abs=0.3)
    assert ssim(noisy, truth) < 1.0


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    extractor = FeatureExtractor("tiny", TinyExtractor().eval(), torch.device("cpu"))
    base = extractor.features(random_pages(40, seed=2))
    same_distribution = extractor.features(random_pages(40, seed=3))
    shifted = [extractor.features(random_pages(40, seed=2, shift=s)) for s in (20, 45)]
    itself = frechet_distance(base, base)
    assert itself == pytest.approx(0.0, abs=1e-6)
    distances = [frechet_distance(base, s) for s in shifted]
    assert itself < frechet_distance(base, same_distribution) < distances[0] < distances[1]
    with pytest.raises(ValueError, match="at least 2 pages"):
        frechet_distance(base[:1], base)


@pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")  # TorchScript files still load
def test_fid_feature_specs_resolve_to_networks(tmp_path: Path) -> None:
    pages = random_pages(2, seed=4)
    by_callable = resolve_fid_features("test_evaluate_metrics:tiny_extractor")
    scripted = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyExtractor()), str(scripted))
    by_script = resolve_fid_features(f"torchscript:{scripted}")
    assert by_script.spec.startswith("torchscript tiny.pt (sha256 ")
    np.testing.assert_allclose(by_callable.features(pages), by_script.features(pages), rtol=1e-5)
    weightfree = resolve_fid_features("weightfree").features(pages)
    assert weightfree.shape == (2, 639)
    with pytest.raises(ValueError, match="expected 'weightfree'"):
        resolve_fid_features("not a spec")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_fid_features("no_such_module_here:build")
    with pytest.raises(FileNotFoundError, match="no such TorchScript file"):
        resolve_fid_features(f"torchscript:{tmp_path / 'absent.pt'}")


def test_inception_weights_file_loads_strictly(tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity's class always loads a file; build its layout with the loading step left out.
    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    torch.manual_seed(0)
    weights = tmp_path / "weights-inception-test.pth"
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.save(
        Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), weights
    )
    extractor = inception_features(weights)
    assert extractor.spec.startswith("inception-v3-compat:2048 (weights weights-inception-test.pth, sha256 ")
    features = extractor.features(random_pages(2, seed=5, size=32))
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(RuntimeError, match="state_dict"):
        inception_features(wrong)
    with pytest.raises(FileNotFoundError):
        inception_features(tmp_path / "absent.pth")


def test_aesthetic_head_formats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stack = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 4),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(4, 1),
    ).eval()
    mlp = tmp_path / "mlp.pth"
    torch.save({f"layers.{k}": v for k, v in stack.state_dict().items()}, mlp)
    embeddings = np.random.default_rng(0).normal(size=(3, 8))
    expected = stack(torch.tensor(embeddings, dtype=torch.float32)).squeeze(-1).detach().numpy()
    np.testing.assert_allclose(load_aesthetic_head(mlp).score(embeddings), expected, rtol=1e-5)
    relu = load_aesthetic_head(mlp, relu=True).score(embeddings)
    assert not np.allclose(relu, expected)

    linear = torch.nn.Linear(8, 1)
    from safetensors.torch import save_file

    path = tmp_path / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()}, str(path))
    head = load_aesthetic_head(path)
    assert head.input_dim == 8
    want = linear(torch.tensor(embeddings, dtype=torch.float32)).squeeze(-1).detach().numpy()
    np.testing.assert_allclose(head.score(embeddings), want, rtol=1e-5)

    bad = tmp_path / "bad.pth"
    torch.save({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4), "extra": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="unexpected"):
        load_aesthetic_head(bad)
    wide = tmp_path / "wide.pth"
    torch.save({"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}, wide)
    with pytest.raises(ValueError, match="2 outputs, not 1"):
        load_aesthetic_head(wide)


def test_clip_similarity_of_a_page_with_itself_is_one() -> None:
    embedder = ImageEmbedder("weightfree")
    a, b = (Image.fromarray(p) for p in random_pages(2, seed=6, size=96))
    vectors = embedder.embed([a, a, b])
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(vectors[0], vectors[2]) < 0.999


def test_paper_row_follows_the_renderer_not_the_style_name() -> None:
    assert paper_style("screenstyle", "screenstyle-v1-0123456789ab-grey-x2") == "screenstyle"
    assert paper_style("grey", "grey") == "grey"
    assert paper_style("halftone", "halftone-v1-abc") is None
    assert paper_style("screenstyle", "halftone-v1-abc") is None  # a misnamed halftone style
    assert paper_style("screenstyle", None) == "screenstyle"  # plain folder: the name is all there is
    assert paper_style("halftone", None) is None


def test_ranking_puts_infinite_psnr_first_and_low_fid_first() -> None:
    best, worst = ranked([("a", 20.0), ("b", math.inf), ("c", 30.0)], "psnr", 2)
    assert best == ["b", "c"] and worst == ["a", "c"]
    best, _ = ranked([("a", 5.0), ("b", 1.0)], "fid", 1)
    assert best == ["b"]
