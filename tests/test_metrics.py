"""Each metric on constructed inputs with a known answer; the CLIP/DINO code paths on tiny random-weight models saved
to a local folder (real weights: -m real_weights)."""

import numpy as np
import pytest

from studio import metrics
from studio.toyworld import evaluate, world


def moving_square(v: int, F: int = 8, S: int = 64, side: int = 16) -> np.ndarray:
    """(F, S, S, 3): a textured square moving right by v px a frame on a flat background."""
    tex = np.random.default_rng(0).integers(120, 255, (side, side, 3), dtype=np.uint8)
    frames = np.full((F, S, S, 3), 40, np.uint8)
    for f in range(F):
        frames[f, 24:24 + side, 4 + v * f:4 + v * f + side] = tex
    return frames


def panning(dx: int, dy: int = 0, F: int = 8, S: int = 48) -> np.ndarray:
    """(F, S, S, 3) windows of a smooth random texture; content moves (dx, dy) px a frame."""
    import cv2

    rng = np.random.default_rng(1)
    big = cv2.GaussianBlur(rng.integers(0, 255, (S + 8 * F, S + 8 * F, 3), dtype=np.uint8), (5, 5), 0)
    ox, oy = (0 if dx <= 0 else 8 * F - 1), (0 if dy <= 0 else 8 * F - 1)
    return np.stack([big[oy - dy * f:oy - dy * f + S, ox - dx * f:ox - dx * f + S]
                     for f in range(F)])


# --- flow, dynamic degree, camera ---------------------------------------------------------------------------


@pytest.mark.parametrize("v", [2, 4, 6])
def test_flow_of_a_square_moving_v_px_a_frame_is_v(v):
    scores = metrics.flow_scores(moving_square(v))
    assert len(scores) == 7
    np.testing.assert_allclose(scores, v, atol=0.25)
    flow = metrics.optical_flow(*moving_square(v)[:2])
    inside = flow[26:38, 8:18]  # inside the square in frame 0
    np.testing.assert_allclose(np.median(inside.reshape(-1, 2), 0), [v, 0], atol=0.25)


def test_dynamic_degree_vbench_rule():
    still = metrics.dynamic_degree(moving_square(0))
    assert still == {"dynamic": False, "flow": 0.0, "threshold": 6.0 * 64 / 256}
    assert metrics.dynamic_degree(moving_square(4))["dynamic"]
    assert not metrics.dynamic_degree(moving_square(1))["dynamic"]  # 1 px < 6·64/256 = 1.5 px
    # fps 16: every second frame is used (VBench samples at 8 fps), so 2 px/frame counts as 4
    d = metrics.dynamic_degree(moving_square(2), fps=16)
    assert abs(d["flow"] - 4.0) < 0.3


def test_camera_error_of_a_pan_that_matches_and_one_that_does_not():
    frames = panning(dx=-3)  # content moves left 3 px/frame: the camera pans right
    F, _, W, _ = frames.shape
    cx = 3 * (F - 1) / W
    good = metrics.camera_error(frames, cx, 0.0)
    assert good["error"] < 0.1 and good["relative"] < 0.05
    np.testing.assert_allclose(good["requested"], [-3.0, 0.0], atol=1e-3)
    wrong = metrics.camera_error(frames, -cx, 0.0)  # asked to pan left
    assert abs(wrong["error"] - 6.0) < 0.2
    assert metrics.camera_error(panning(0, dy=2), 0.0, 0.0)["measured"][1] == pytest.approx(2.0, abs=0.1)


def test_temporal_consistency_pixel():
    frames = moving_square(3)
    assert metrics.temporal_consistency_pixel(np.stack([frames[0]] * 5)) == 1.0
    flicker = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)] * 2)
    assert metrics.temporal_consistency_pixel(flicker) == 0.0
    assert 0.0 < metrics.temporal_consistency_pixel(frames) < 1.0


# --- box adherence (toy-world colours) ---------------------------------------------------------------------


def _clip_along(boxes: np.ndarray) -> np.ndarray:
    """A yellow star whose centre follows the boxes' centres, drawn by the toy world."""
    S = world.SIZE
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1) * S  # (F, 2) px
    spec = world.SubjectSpec("yellow", "star", 6.0, centres.astype(np.float32), None)
    return world.render_clip("sky", [spec], seed=3).frames


def test_box_adherence_perfect_and_wrong_side():
    from studio.controls.boxes import interpolate

    boxes = interpolate(evaluate.LEFT_TO_RIGHT, world.FRAMES)  # (F, 4)
    frames = _clip_along(boxes)
    perfect = metrics.box_adherence(frames, "yellow star", boxes)
    assert perfect["hit_rate"] == 1.0 and perfect["iou"] > 0.5
    left = np.tile([0.0, 0.25, 0.4, 0.75], (world.FRAMES, 1)).astype(np.float32)  # (F, 4): the left side
    right = left.copy()
    right[:, [0, 2]] = 1.0 - left[:, [2, 0]]
    on_right = _clip_along(right)  # the subject stays on the right: the wrong side of every left box
    wrong = metrics.box_adherence(on_right, "yellow star", left)
    assert wrong == {"hit_rate": 0.0, "iou": 0.0}
    assert metrics.box_adherence(_clip_along(left), "yellow star", left)["hit_rate"] == 1.0


def test_box_adherence_needs_a_colour():
    with pytest.raises(metrics.MetricUnavailable, match="colour"):
        metrics.box_adherence(moving_square(1)[:, :32, :32], "a dog", np.zeros((8, 4)))


def test_crop_boxes():
    frames = moving_square(0, F=2)
    crops = metrics.crop_boxes(frames, np.array([[0.25, 0.5, 0.5, 1.0], [0.0, 0.0, 0.001, 0.001]]))
    assert crops[0].shape == (32, 16, 3) and crops[1].shape == (1, 1, 3)


# --- CLIP / DINO code paths -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """Tiny random CLIP and ViT (DINO-layout) models saved to local folders, loaded through the real code path."""
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, ViTConfig,
                              ViTImageProcessorPil, ViTModel)

    root = tmp_path_factory.mktemp("encoders")
    tok = CLIPTokenizer.from_pretrained("models/toyworld", subfolder="tokenizer")
    clip_dir, dino_dir = root / "clip", root / "dino"
    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    cfg = CLIPConfig(text_config=dict(**small, vocab_size=len(tok), max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=8)
    import torch

    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8)).save_pretrained(dino_dir)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return metrics.encoder("clip", str(clip_dir)), metrics.encoder("dino", str(dino_dir))


def _raw_features(enc, images) -> np.ndarray:
    """(N, D) embeddings straight from the transformers model, not normalised: the reference for the metrics."""
    import torch
    from PIL import Image

    pix = enc.processor(images=[Image.fromarray(np.ascontiguousarray(i)) for i in images],
                        return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if enc.kind == "clip":
            out = enc.model.get_image_features(pixel_values=pix)
            out = out if torch.is_tensor(out) else out.pooler_output
        else:
            out = enc.model(pixel_values=pix).last_hidden_state[:, 0]
    return out.float().numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) cosines of the rows of a (N, D) and b (M, D), by numpy."""
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def test_clip_and_dino_metrics_match_a_numpy_cosine(tiny_encoders):
    """Each metric equals the cosine computed by numpy from the model's own (unnormalised) embeddings."""
    import torch

    clip, dino = tiny_encoders
    frames = moving_square(2, F=4)
    prompt = "a yellow star on sky"
    ids = clip.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        text = clip.model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        text = (text if torch.is_tensor(text) else text.pooler_output).float().numpy()  # (1, D)
    want_t = _cos(_raw_features(clip, list(frames)), text).mean()
    assert metrics.clip_t(frames, prompt, clip) == pytest.approx(want_t, abs=1e-5)
    assert metrics.temporal_consistency_clip(np.stack([frames[0]] * 4), clip) == pytest.approx(1.0, abs=1e-5)
    e = _raw_features(clip, list(frames))
    want_tc = np.mean([_cos(e[i:i + 1], e[i + 1:i + 2])[0, 0] for i in range(3)])
    assert metrics.temporal_consistency_clip(frames, clip) == pytest.approx(want_tc, abs=1e-5)
    rng = np.random.default_rng(5)
    refs = [frames[0, 16:48, 0:32], rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)]
    boxes = np.tile([0.0, 0.25, 0.5, 0.75], (4, 1))  # (F, 4): x 0..32, y 16..48 px
    for enc in (clip, dino):
        assert metrics.image_similarity(frames[:1], [frames[0]], enc) == pytest.approx(1.0, abs=1e-5)
        want_i = _cos(_raw_features(enc, list(frames)), _raw_features(enc, refs)).mean()
        assert metrics.image_similarity(frames, refs, enc) == pytest.approx(want_i, abs=1e-5)
        crops = [f[16:48, 0:32] for f in frames]
        want_r = _cos(_raw_features(enc, crops), _raw_features(enc, refs)).mean()
        assert metrics.region_similarity(frames, boxes, refs, enc) == pytest.approx(want_r, abs=1e-5)
        assert abs(want_r - want_i) > 1e-4  # cropping changes the answer: the crop is what was embedded
    with pytest.raises(metrics.MetricUnavailable, match="no subject images"):
        metrics.image_similarity(frames, [], clip)


def test_missing_weights_are_skipped_with_the_reason(monkeypatch):
    """Whatever this machine has cached: a model id no cache holds is skipped, naming it and the remedy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(metrics.MetricUnavailable, match=r"'studio-tests/no-such-clip'.*local Hugging Face cache"):
        metrics.encoder("clip", "studio-tests/no-such-clip")
    with pytest.raises(metrics.MetricUnavailable, match=r"DINO weights 'studio-tests/no-such-dino'"):
        metrics.encoder("dino", "studio-tests/no-such-dino")


@pytest.mark.real_weights
def test_real_clip_prefers_the_matching_prompt():
    """With openai/clip-vit-base-patch32 cached: a toy-world clip of a yellow star on sky scores higher with its own
    caption than with an unrelated one."""
    clip = metrics.encoder("clip")
    frames = evaluate.ground_truth_clip({"colour": "yellow", "shape": "star", "motion": "right",
                                         "background": "sky", "seed": 1}).frames
    assert metrics.clip_t(frames, "a yellow star in a blue sky", clip) > metrics.clip_t(frames, "a bowl of soup", clip)
