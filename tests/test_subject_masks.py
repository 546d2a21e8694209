"""Subject masks: GrabCut on a synthetic photo, the fallbacks of "auto", offline model errors, files, validation."""

import numpy as np
import pytest

from studio.pipelines import ModelLoadError
from studio.subjects import masks as M


def disc_photo(width: int = 128, height: int = 112, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A shaded red disc on a noisy, striped green background: (image (H, W, 3), disc (H, W) bool, box)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    cx, cy, r = 0.45 * width, 0.55 * height, 0.25 * min(width, height)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    image = np.zeros((height, width, 3), np.float32)
    stripes = 30 * np.sin(xx / 3.0) + 20 * np.cos((xx + yy) / 5.0)
    image[..., 0] = 40 + rng.normal(0, 15, (height, width))
    image[..., 1] = 140 + stripes + rng.normal(0, 25, (height, width))
    image[..., 2] = 50 + rng.normal(0, 15, (height, width))
    shade = 1.0 - 0.4 * ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2  # brighter centre, darker rim
    image[disc] = np.stack([200 * shade, 30 * shade, 35 * shade], -1)[disc] + rng.normal(0, 10, (disc.sum(), 3))
    box = [(cx - 1.4 * r) / width, (cy - 1.4 * r) / height, (cx + 1.4 * r) / width, (cy + 1.4 * r) / height]
    return image.clip(0, 255).astype(np.uint8), disc, box


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def sam_on_disk() -> bool:
    return M._weights_on_disk(M.SAM_MODEL_ID)


# --- grabcut and auto ----------------------------------------------------------------------------------------


def test_grabcut_finds_the_disc():
    image, disc, box = disc_photo()
    result = M.segment(image, box, "grabcut")
    assert result.backend == "grabcut" and result.note == ""
    assert result.mask.shape == disc.shape and result.mask.dtype == bool
    assert iou(result.mask, disc) > 0.8
    assert not result.mask[~M.box_mask(disc.shape, M.check_box(box))].any()  # nothing outside the box


def test_grabcut_is_deterministic():
    image, _, box = disc_photo(seed=3)
    a, b = M.segment(image, box, "grabcut").mask, M.segment(image, box, "grabcut").mask
    assert np.array_equal(a, b)


def test_grabcut_on_a_large_photo_works_downscaled():
    image, disc, box = disc_photo(width=900, height=700, seed=1)  # > GRABCUT_MAX_SIDE: runs on a smaller copy
    mask = M.segment(image, box, "grabcut").mask
    assert mask.shape == (700, 900)
    assert iou(mask, disc) > 0.8


def test_auto_uses_grabcut_offline():
    if sam_on_disk():
        pytest.skip("SAM weights are in the local cache, so auto uses them")
    image, disc, box = disc_photo()
    result = M.segment(image, box)
    assert result.backend == "grabcut"
    assert iou(result.mask, disc) > 0.8


def test_auto_falls_back_to_the_box_when_grabcut_degenerates(monkeypatch):
    if sam_on_disk():
        pytest.skip("SAM weights are in the local cache, so auto uses them")
    image, _, box = disc_photo()
    monkeypatch.setattr(M, "grabcut", lambda image, box: (np.zeros(image.shape[:2], bool), "found nothing"))
    result = M.segment(image, box)
    assert result.backend == "box" and "found nothing" in result.note
    assert np.array_equal(result.mask, M.box_mask(image.shape[:2], M.check_box(box)))


def test_auto_uses_the_box_when_it_covers_the_whole_photo():
    if sam_on_disk():
        pytest.skip("SAM weights are in the local cache, so auto uses them")
    image, _, _ = disc_photo()
    result = M.segment(image, [0, 0, 1, 1])
    assert result.backend == "box" and "whole image" in result.note
    assert result.mask.all()


def test_grabcut_mask_that_fills_its_box_is_flagged():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 20:70] = True
    box = (0.2, 0.1, 0.7, 0.6)
    assert "whole box" in M._degenerate(mask, box)
    assert "almost nothing" in M._degenerate(np.zeros_like(mask), box)
    mask[30:40] = False
    assert M._degenerate(mask, box) == ""


def test_box_backend_is_the_box():
    image = np.zeros((40, 50, 3), np.uint8)
    mask = M.segment(image, [0.1, 0.25, 0.5, 0.75], "box").mask
    expected = np.zeros((40, 50), bool)
    expected[10:30, 5:25] = True
    assert np.array_equal(mask, expected)


# --- model backends ------------------------------------------------------------------------------------------


def test_sam_offline_raises_model_load_error_naming_the_hub_id():
    if sam_on_disk():
        pytest.skip("SAM weights are in the local cache")
    image, _, box = disc_photo()
    with pytest.raises(ModelLoadError, match="facebook/sam-vit-base") as err:
        M.segment(image, box, "sam")
    assert "grabcut" in str(err.value)


def test_segment_anything_without_the_package_raises_model_load_error():
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("segment_anything imports here")
    image, _, box = disc_photo()
    with pytest.raises(ModelLoadError, match="segment_anything"):
        M.segment(image, box, "segment-anything")


def test_owl_offline_raises_model_load_error_naming_the_hub_id():
    if M._weights_on_disk(M.OWL_MODEL_ID):
        pytest.skip("OWLv2 weights are in the local cache")
    image, _, _ = disc_photo()
    with pytest.raises(ModelLoadError, match="google/owlv2-base-patch16-ensemble"):
        M.segment_word(image, "ball", "owl")


def test_sam_backend_runs_a_local_model_folder(tmp_path):
    """The real transformers code path on a tiny random-weight SAM saved in the hub format."""
    import torch
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig,
                              SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_channels=16,
                             image_size=128, patch_size=16, global_attn_indexes=[1], window_size=4, mlp_dim=64,
                             num_pos_feats=8)
    config = SamConfig(vision_config=vision,
                       prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=128, patch_size=16,
                                                                    mask_input_channels=4),
                       mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2,
                                                                num_attention_heads=2, mlp_dim=32,
                                                                iou_head_hidden_dim=16))
    torch.manual_seed(0)
    SamModel(config).save_pretrained(tmp_path)
    image_processor = SamImageProcessorPil(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    SamProcessor(image_processor=image_processor).save_pretrained(tmp_path)
    image, _, box = disc_photo(width=120, height=96)
    result = M.segment(image, box, "sam", sam_model=str(tmp_path), device="cpu")
    assert result.backend == "sam"
    assert result.mask.shape == (96, 120) and result.mask.dtype == bool
    assert M.segment(image, box, sam_model=str(tmp_path), device="cpu").backend == "sam"  # auto: weights on disk


# --- words ---------------------------------------------------------------------------------------------------


def test_segment_word_offline_uses_the_centre_box():
    if M._weights_on_disk(M.OWL_MODEL_ID) or sam_on_disk():
        pytest.skip("detector or SAM weights are in the local cache")
    image, disc, _ = disc_photo()
    result = M.segment_word(image, "ball")
    assert result.box == M.CENTRE_BOX and "centre box" in result.note
    assert result.backend == "grabcut"
    assert iou(result.mask, disc) > 0.8
    assert np.array_equal(M.segment_word(image, "ball").mask, result.mask)  # deterministic


def test_word_must_be_a_word():
    image, _, _ = disc_photo()
    with pytest.raises(ValueError, match="word: must be a non-empty"):
        M.segment_word(image, "  ")


# --- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("box, message", [
    ([0.5, 0.1, 0.2, 0.9], "box: x1 must be > x0 (got [0.5, 0.1, 0.2, 0.9])"),
    ([0.1, 0.6, 0.5, 0.6], "box: y1 must be > y0 (got [0.1, 0.6, 0.5, 0.6])"),
    ([-0.1, 0.1, 0.5, 0.9], "box: x0 must be in 0..1 (got [-0.1, 0.1, 0.5, 0.9])"),
    ([0.1, 0.1, 0.5, 1.5], "box: y1 must be in 0..1 (got [0.1, 0.1, 0.5, 1.5])"),
    ([0.1, 0.1, 0.5], "box: must have 4 numbers [x0, y0, x1, y1] (got 3: [0.1, 0.1, 0.5])"),
    ([0.1, "a", 0.5, 0.9], "box: must be 4 numbers"),
    ([0.1, float("nan"), 0.5, 0.9], "box: y0 must be in 0..1"),
    ("0.1 0.1 0.5 0.9", "box: must be [x0, y0, x1, y1] in 0..1"),
])
def test_bad_boxes_name_the_field_and_value(box, message):
    image, _, _ = disc_photo()
    with pytest.raises(ValueError) as err:
        M.segment(image, box, "box")
    assert str(err.value).startswith(message)


def test_check_box_takes_a_field_label():
    with pytest.raises(ValueError, match=r"^subjects\[0\].box: x1 must be > x0"):
        M.check_box([0.5, 0, 0.5, 1], field="subjects[0].box")
    assert M.check_box(np.array([0, 0, 1, 1])) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.float32), "image: must be uint8 RGB in 0..255 (got dtype float32)"),
    (np.zeros((32, 32, 4), np.uint8), "image: must have shape (H, W, 3) RGB (got (32, 32, 4)); drop the alpha"),
    (np.zeros((32, 32), np.uint8), "image: must have shape (H, W, 3) RGB (got (32, 32))"),
    (np.zeros((4, 32, 3), np.uint8), "image: must be at least 8x8 pixels (got 32x4)"),
    ([[0, 0, 0]], "image: must be a numpy array"),
])
def test_bad_images_are_value_errors(image, message):
    with pytest.raises(ValueError) as err:
        M.segment(image, [0.1, 0.1, 0.9, 0.9], "box")
    assert str(err.value).startswith(message)


def test_unknown_backend_is_a_value_error():
    image, _, _ = disc_photo()
    with pytest.raises(ValueError, match="backend: must be one of auto, sam, segment-anything, grabcut, box"):
        M.segment(image, [0.1, 0.1, 0.9, 0.9], "magic")


# --- files and previews --------------------------------------------------------------------------------------


def test_mask_png_roundtrip(tmp_path):
    from PIL import Image

    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    path = M.save_mask(mask, tmp_path / "m.png")
    with Image.open(path) as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    loaded = M.load_mask(path)
    assert loaded.dtype == bool and np.array_equal(loaded, mask)


def test_save_mask_accepts_0_255_and_soft_masks_and_rejects_3d(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5] = 255
    assert np.array_equal(M.load_mask(M.save_mask(mask, tmp_path / "m.png")), mask == 255)
    soft = np.linspace(0, 1, 120, dtype=np.float32).reshape(10, 12)
    assert np.array_equal(M.load_mask(M.save_mask(soft, tmp_path / "s.png")), soft > 0.5)
    with pytest.raises(ValueError, match="mask: must be a 2-D"):
        M.save_mask(np.zeros((4, 4, 3), bool), tmp_path / "bad.png")


def test_overlay_tints_the_subject_and_dims_the_rest():
    image = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    out = M.overlay(image, mask, color=(255, 0, 0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[32, 32, 0] > out[32, 32, 1]  # tinted red inside
    assert (out[2, 2] < image[2, 2]).all()  # dimmed outside
    assert tuple(out[16, 30]) == (255, 0, 0)  # outline on the edge
    with pytest.raises(ValueError, match="mask: must match the image's"):
        M.overlay(image, mask[:10])
