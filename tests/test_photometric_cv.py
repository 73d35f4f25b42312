"""The streaming workers' OpenCV photometric ops (ssl_kit/data/photometric_cv.py) against the batched torch ops of
augment.py they replace on the CPU: same random numbers, same values (float within 1e-4, uint8 within one level)."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from ssl_kit.data import augment as A
from ssl_kit.data.photometric_draws import PhotometricDraw

from ssl_kit.data import views as V
from ssl_kit.data import photometric_cv as CV


def photos(n=8, size=96, seed=0) -> torch.Tensor:
    """uint8 (n, 3, size, size) random crops of the photos scikit-learn ships, with a grey and a saturated patch."""
    rng = np.random.default_rng(seed)
    sources = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        photo = sources[i % 2]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out[i] = torch.from_numpy(photo[top:top + size, left:left + size].copy()).permute(2, 0, 1)
    out[0, :, :10, :10] = 128  # grey: no hue
    out[1, :, :10, :10] = torch.tensor([255, 255, 0], dtype=torch.uint8).view(3, 1, 1)  # tied maxima
    return out


def view(**kwargs) -> V.ContrastiveView:
    channels = kwargs.pop("channels", 3)
    return V.ContrastiveView(V.Normalize([0.5] * channels, [0.25] * channels), **kwargs)


def torch_float(x: torch.Tensor, draw: PhotometricDraw) -> torch.Tensor:
    y = A.apply_color_jitter(A.to_unit_float(x), draw.jitter)
    y = A.apply_grayscale(y, draw.grayscale)
    return A.apply_solarize(A.apply_blur(y, draw.blur), draw.solarize)


def opencv_float(x: torch.Tensor, draw: PhotometricDraw) -> torch.Tensor:
    taps = CV._blur_taps(draw)
    out = []
    for i in range(x.shape[0]):
        image = np.ascontiguousarray(x[i].permute(1, 2, 0).numpy(), dtype=np.float32) / np.float32(255)
        y = CV._one_image(image if x.shape[1] == 3 else image[..., 0], i, draw, taps)
        out.append(torch.from_numpy(y.reshape(*y.shape[:2], x.shape[1])).permute(2, 0, 1))
    return torch.stack(out)


CONFIGS = {
    "simclr": dict(jitter_strength=1.0, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
    "byol-view-2": dict(jitter_strength=0.5, blur_prob=0.1, solarize_prob=0.2),
    "everything-always": dict(jitter_strength=1.0, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0,
                              solarize_prob=1.0),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_opencv_ops_equal_the_batched_ops_before_rounding(config):
    x, v = photos(), view(**CONFIGS[config])
    torch.manual_seed(3)
    draw = v.draw_photometric(x.shape[0], 3, x.shape[-1])
    expected = torch_float(x, draw)
    got = opencv_float(x, draw)
    assert (got - expected).abs().max() < 1e-4
    assert not torch.allclose(expected, A.to_unit_float(x), atol=0.02)  # something happened


def test_hue_shifts_of_either_sign_and_half_turns_match():
    x = photos(6)
    shifts = torch.tensor([-0.5, -0.2, -0.01, 0.0, 0.2, 0.5])
    ones = torch.ones(6)
    draw = PhotometricDraw(A.JitterDraw(torch.ones(6, dtype=torch.bool), ones, ones, ones, shifts), None, None, None)
    assert (opencv_float(x, draw) - torch_float(x, draw)).abs().max() < 1e-5


def test_blur_taps_cut_at_four_sigma_stay_within_1e4_of_the_full_kernel():
    x = photos(4, size=224)
    sigmas = torch.tensor([0.1, 0.7, 1.6, 2.0])
    draw = PhotometricDraw(None, None, A.BlurDraw(sigmas, torch.ones(4, dtype=torch.bool), 23), None)
    taps = CV._blur_taps(draw)
    assert [len(t) for t in taps] == [3, 7, 15, 17]  # ±⌈4σ⌉, never beyond the 23-tap kernel
    assert all(abs(float(t.sum()) - 1) < 1e-6 for t in taps)
    assert (opencv_float(x, draw) - A.gaussian_blur(A.to_unit_float(x), 23, sigmas)).abs().max() < 1e-4


def test_uint8_outputs_differ_by_at_most_one_level_on_rare_pixels():
    x, v = photos(), view(**CONFIGS["simclr"])
    outputs = []
    for backend in ("torch", "opencv", "auto"):
        torch.manual_seed(11)
        outputs.append(v.photometric_uint8(x, backend=backend))
    batched, opencv, auto = outputs
    assert torch.equal(auto, opencv)  # CPU tensors: OpenCV
    difference = (batched.int() - opencv.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3
    torch.manual_seed(11)
    assert torch.equal(batched, (v.photometric(A.to_unit_float(x)) * 255).round().to(torch.uint8))


def test_one_channel_images_and_the_identity_view():
    x = photos()[:, :1].contiguous()
    v = view(channels=1, jitter_strength=1.0, jitter_prob=1.0, blur_prob=0.5, solarize_prob=0.5)
    torch.manual_seed(5)
    draw = v.draw_photometric(x.shape[0], 1, x.shape[-1])
    assert draw.jitter.colour is None and draw.grayscale is None
    assert (opencv_float(x, draw) - torch_float(x, draw)).abs().max() < 1e-4
    assert v.photometric_uint8(x).shape == x.shape
    identity = view(jitter_prob=0.0, grayscale_prob=0.0)
    rgb = photos()
    assert torch.equal(identity.photometric_uint8(rgb, backend="opencv"), rgb)


def test_drawing_first_keeps_the_random_stream_of_the_op_by_op_functions():
    """ContrastiveView.photometric draws every number up front; the result equals calling the public ops one after
    the other from the same seed (the stream recorded runs were made with)."""
    x = A.to_unit_float(photos())
    v = view(**CONFIGS["everything-always"] | dict(jitter_prob=0.6, grayscale_prob=0.3, blur_prob=0.5,
                                                    solarize_prob=0.4))
    torch.manual_seed(7)
    drawn = v.photometric(x)
    torch.manual_seed(7)
    y = A.color_jitter(x, 1.0, 0.6)
    y = A.random_grayscale(y, 0.3)
    y = A.random_blur(y, 0.5)
    assert torch.equal(drawn, A.random_solarize(y, 0.4))
