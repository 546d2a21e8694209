"""Video metrics of the evaluation harness: each a function of uint8 frames (F, H, W, 3), with its definition and
source in its docstring.

Model-based metrics (CLIP-T, CLIP-I, DINO-I, R-CLIP, R-DINO, CLIP temporal consistency) load real weights from the
local Hugging Face cache only (`local_files_only`); when they are not there the metric is skipped with the reason
(`MetricUnavailable`), never replaced by a stand-in. Flow-based metrics (dynamic degree, camera error) and the
toy-world box adherence run offline with OpenCV and numpy.

Shapes: F frames, H×W pixels, D embedding size.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

logger = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dino-vits16"  # DINO v1 ViT-S/16; "facebook/dinov2-small" also loads (AutoModel)


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (weights not cached, no subject images, no colour to find a subject)."""


# Every value the evaluation writes per video: its definition and its source (results.json `definitions`).
DEFINITIONS: dict[str, dict[str, str]] = {
    "clip_t": {
        "definition": "mean over frames of cos(CLIP image embedding of the frame, CLIP text embedding of the shot's "
                      "prompt); raw cosine, not x100",
        "source": "CLIP score (Hessel et al. 2021) without its x2.5 rescale, reported as CLIP-T by MotionBooth, "
                  "Magic-Me and VideoMaker and as Text-S by Video Alchemist; metrics.clip_t"},
    "clip_i": {
        "definition": "per subject with images, mean over all (frame, image of that subject) pairs of the cosine of "
                      "their CLIP image embeddings; then the mean over those subjects",
        "source": "DreamBooth's CLIP-I (Ruiz et al. 2023) applied per frame, as in MotionBooth, Magic-Me and "
                  "VideoMaker; metrics.image_similarity"},
    "dino_i": {
        "definition": "as clip_i with DINO embeddings (the final-layer-normed CLS token)",
        "source": "DreamBooth's DINO subject fidelity (Ruiz et al. 2023) applied per frame, as in MotionBooth, "
                  "Magic-Me and VideoMaker; metrics.image_similarity"},
    "r_clip": {
        "definition": "per subject with boxes and images, mean over (frame, image of that subject) pairs of the "
                      "CLIP cosine with each frame cropped to that subject's requested box in the frame; then the "
                      "mean over those subjects",
        "source": "MotionBooth §4 region CLIP similarity (METHODS.md §1.4); metrics.region_similarity"},
    "r_dino": {
        "definition": "as r_clip with DINO embeddings",
        "source": "MotionBooth §4 region DINO similarity (METHODS.md §1.4); metrics.region_similarity"},
    "temporal_consistency_clip": {
        "definition": "mean cosine of the CLIP image embeddings of consecutive frames; 1 = no change",
        "source": "frame consistency (T-Cons) of Tune-A-Video, MotionBooth and VideoMaker; "
                  "metrics.temporal_consistency_clip"},
    "temporal_consistency_pixel": {
        "definition": "1 - mean absolute difference of consecutive frames in 0..1 units; not comparable to the CLIP "
                      "one",
        "source": "this project's stand-in for when no CLIP weights are cached, not from the papers; "
                  "metrics.temporal_consistency_pixel"},
    "dynamic_degree": {
        "definition": "1 if the video is dynamic (at least round(n/4) of its frame pairs, frames every round(fps/8), "
                      "have flow scores above 6·min(H, W)/256 px), else 0; a configuration's mean is the share of "
                      "dynamic videos",
        "source": "VBench's dynamic degree (Huang et al. 2024, dynamic_degree.py) with OpenCV Farnebäck flow "
                  "instead of RAFT; metrics.dynamic_degree"},
    "flow": {
        "definition": "mean over frame pairs (frames every round(fps/8)) of the mean of the top 5% Farnebäck flow "
                      "magnitudes, px at the render size: the score the dynamic degree thresholds",
        "source": "VBench's dynamic-degree pair score (Huang et al. 2024) with Farnebäck (Farnebäck 2003) instead of "
                  "RAFT; metrics.flow_scores"},
    "box_hit_rate": {
        "definition": "share of frames whose subject centroid lies in its requested box, the subject found by its "
                      "toy-world colour; mean over the boxed subjects",
        "source": "the box-adherence idea of MotionBooth and Direct-A-Video, which find the subject with a detector; "
                  "here studio.toyworld.evaluate.box_adherence (toy-world model only); metrics.box_adherence"},
    "box_iou": {
        "definition": "mean over frames of the IoU of the subject's bounding box (its toy-world colour's pixels; 0 "
                      "where not found) with its requested box; mean over the boxed subjects",
        "source": "as box_hit_rate; metrics.box_adherence"},
    "camera_error": {
        "definition": "L2 distance (px/frame, at the render size) of the mean content motion (median Farnebäck "
                      "flow per frame pair) from the motion the pan asks for, (-cx·W, -cy·H)/(F-1)",
        "source": "MotionBooth §4 compares flow with the requested camera speed (its formula not retrieved, "
                  "METHODS.md §1.4); this L2 form is this project's; metrics.camera_error"},
    "camera_measured": {
        "definition": "[dx, dy] px/frame: the measured mean content motion behind camera_error",
        "source": "metrics.global_motion (median of OpenCV Farnebäck flow)"},
    "camera_requested": {
        "definition": "[dx, dy] px/frame: the content motion the shot's pan asks for, (-cx·W, -cy·H)/(F-1)",
        "source": "the shot's camera convention (camera.cx / camera.cy: the travel over the clip)"},
}


# --- feature models (CLIP, DINO) -------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str], object] = {}
_MODELS_LOCK = threading.Lock()


def _not_cached(kind: str, model_id: str, err: Exception) -> MetricUnavailable:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return MetricUnavailable(f"{kind} weights '{model_id}' are not in the local Hugging Face cache ({reason}); "
                             f"download them where there is network (`hf download {model_id}`) and set HF_HOME")


class ImageEncoder:
    """Unit-norm image (and, for CLIP, text) embeddings from a transformers model loaded from the local cache."""

    def __init__(self, kind: str, model_id: str):
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.kind, self.model_id = kind, model_id
        try:
            if kind == "clip":
                self.model = CLIPModel.from_pretrained(model_id, local_files_only=True)
                self.tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
            else:
                self.model = AutoModel.from_pretrained(model_id, local_files_only=True)
                self.tokenizer = None
            self.processor = AutoImageProcessor.from_pretrained(model_id, local_files_only=True)
        except (OSError, ValueError) as e:
            raise _not_cached(kind.upper(), model_id, e) from None
        self.model.eval()
        self._torch = torch

    def images(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, D) unit-norm embeddings of N RGB uint8 images (any sizes)."""
        torch = self._torch
        from PIL import Image

        pix = self.processor(images=[Image.fromarray(np.ascontiguousarray(i)) for i in images],
                             return_tensors="pt")["pixel_values"]  # (N, 3, S, S)
        with torch.inference_mode():
            if self.kind == "clip":
                out = self.model.get_image_features(pixel_values=pix)
                emb = out if torch.is_tensor(out) else out.pooler_output  # (N, D)
            else:  # DINO / DINOv2: the final-layer-normed CLS token, as DINO's own eval uses
                emb = self.model(pixel_values=pix).last_hidden_state[:, 0]  # (N, D)
        emb = emb.float().numpy()
        return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)

    def text(self, prompt: str) -> np.ndarray:
        """(D,) unit-norm CLIP text embedding (the prompt truncated to CLIP's 77 tokens)."""
        torch = self._torch
        ids = self.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
            emb = out if torch.is_tensor(out) else out.pooler_output  # (1, D)
        emb = emb[0].float().numpy()
        return emb / max(float(np.linalg.norm(emb)), 1e-12)


def encoder(kind: str, model_id: str | None = None) -> ImageEncoder:
    """The cached CLIP ('clip') or DINO ('dino') encoder; MetricUnavailable when its weights are not cached."""
    model_id = model_id or (CLIP_MODEL if kind == "clip" else DINO_MODEL)
    with _MODELS_LOCK:
        key = (kind, model_id)
        if key not in _MODELS:
            t0 = time.perf_counter()
            try:
                _MODELS[key] = ImageEncoder(kind, model_id)
            except MetricUnavailable as e:
                logger.info("%s metrics skipped: %s", kind.upper(), e)
                raise
            logger.info("loaded the %s encoder %s in %.1f s", kind.upper(), model_id, time.perf_counter() - t0)
        return _MODELS[key]


# --- model-based metrics ----------------------------------------------------------------------------------------


def clip_t(frames: np.ndarray, prompt: str, enc: ImageEncoder) -> float:
    """CLIP-T: mean over frames of cos(CLIP image embedding of the frame, CLIP text embedding of the prompt).

    Source: the CLIP score of text-image alignment (Hessel et al. 2021, without the ×2.5 rescale), as reported by
    MotionBooth, Magic-Me and VideoMaker as CLIP-T and by Video Alchemist as Text-S. Raw cosine, not ×100.
    """
    return float((enc.images(list(frames)) @ enc.text(prompt)).mean())


def image_similarity(frames: np.ndarray, references: list[np.ndarray], enc: ImageEncoder) -> float:
    """CLIP-I / DINO-I: mean over all (frame, reference image) pairs of the cosine of their embeddings.

    Source: DreamBooth's CLIP-I and DINO subject-fidelity metrics, applied per frame and averaged (MotionBooth,
    Magic-Me, VideoMaker; Video Alchemist's Vid-S averages all pairs the same way). DINO is preferred for identity
    as it separates instances of one class better than CLIP.
    """
    if not references:
        raise MetricUnavailable("no subject images to compare with (subjects[i].reference or a tuned subject)")
    return float((enc.images(list(frames)) @ enc.images(list(references)).T).mean())


def crop_boxes(frames: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Per frame, the pixels inside its normalised box [x0, y0, x1, y1] (at least 1×1)."""
    _, H, W, _ = frames.shape
    out = []
    for f, (x0, y0, x1, y1) in zip(frames, boxes):
        a, b = int(np.clip(np.floor(x0 * W), 0, W - 1)), int(np.clip(np.floor(y0 * H), 0, H - 1))
        c, d = int(np.clip(np.ceil(x1 * W), a + 1, W)), int(np.clip(np.ceil(y1 * H), b + 1, H))
        out.append(f[b:d, a:c])
    return out


def region_similarity(frames: np.ndarray, boxes: np.ndarray, references: list[np.ndarray],
                      enc: ImageEncoder) -> float:
    """R-CLIP / R-DINO: CLIP-I / DINO-I with each frame cropped to the subject's (requested) box in that frame.

    Source: MotionBooth §4 (region CLIP / DINO similarity to the subject's images), METHODS.md §1.4.
    """
    if not references:
        raise MetricUnavailable("no subject images to compare with (subjects[i].reference or a tuned subject)")
    crops = enc.images(crop_boxes(frames, boxes))  # (F, D)
    return float((crops @ enc.images(list(references)).T).mean())


def temporal_consistency_clip(frames: np.ndarray, enc: ImageEncoder) -> float:
    """Temporal consistency (CLIP): mean cosine of the CLIP embeddings of consecutive frames; 1 = no change.

    Source: the "T-Cons" / frame consistency of Tune-A-Video, MotionBooth and VideoMaker.
    """
    if len(frames) < 2:
        return 1.0
    e = enc.images(list(frames))  # (F, D)
    return float((e[:-1] * e[1:]).sum(1).mean())


def temporal_consistency_pixel(frames: np.ndarray) -> float:
    """Temporal consistency (pixel fallback, not comparable to the CLIP one): 1 − mean absolute difference of
    consecutive frames in 0..1 units; 1 = identical frames, 0 = black following white. Used when no CLIP
    weights are cached; a stand-in of this project, not from the papers."""
    if len(frames) < 2:
        return 1.0
    f = frames.astype(np.float32) / 255.0
    return float(1.0 - np.abs(f[1:] - f[:-1]).mean())


# --- optical flow ---------------------------------------------------------------------------------------------


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H, W, 2) dense flow (dx, dy) in pixels from RGB frame a to b: OpenCV Farnebäck (Farnebäck 2003).

    b[y + dy, x + dx] ≈ a[y, x]. Window and pyramid scaled to the frame (frames here may be 32 px).
    """
    import cv2

    ga, gb = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (a, b))
    side = min(a.shape[:2])
    levels = max(1, min(3, int(np.log2(max(side, 16) / 8))))
    win = int(np.clip(side // 4, 5, 15)) | 1
    return cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, levels, win, 5, 5, 1.1, 0)


def _frame_step(fps: float | None) -> int:
    return max(1, round((fps or 8) / 8))


def flow_scores(frames: np.ndarray, fps: float | None = None) -> np.ndarray:
    """(P,) per consecutive pair (frames taken every round(fps/8)): mean of the top 5% flow magnitudes."""
    fr = frames[::_frame_step(fps)]
    out = []
    for a, b in zip(fr, fr[1:]):
        mag = np.linalg.norm(optical_flow(a, b), axis=-1).ravel()  # (H·W,)
        k = max(1, int(mag.size * 0.05))
        out.append(float(np.sort(mag)[-k:].mean()))
    return np.array(out, np.float64)


def dynamic_degree(frames: np.ndarray, fps: float | None = None) -> dict:
    """Dynamic degree, VBench's rule (Huang et al. 2024, `dynamic_degree.py`), with Farnebäck flow instead of RAFT.

    Frames are taken every round(fps/8); for each consecutive pair, the mean of the top 5% flow magnitudes. The
    video is dynamic if at least round(n/4) pairs (n = frames kept; VBench: round(4·n/16)) exceed
    6·min(H, W)/256 pixels. Over a set of videos the dynamic degree is the fraction of dynamic videos.
    Returns {"dynamic": bool, "flow": mean pair score (px), "threshold": px}.
    """
    scores = flow_scores(frames, fps)
    n = len(frames[::_frame_step(fps)])
    threshold = 6.0 * min(frames.shape[1:3]) / 256.0
    need = max(1, round(n / 4))
    return {"dynamic": bool((scores > threshold).sum() >= need), "flow": float(scores.mean()) if len(scores) else 0.0,
            "threshold": threshold}


def global_motion(frames: np.ndarray) -> np.ndarray:
    """(F-1, 2) content motion (dx, dy) in px between consecutive frames: the median of the Farnebäck flow (the
    median follows the background, which covers most of the frame, rather than a subject moving on its own)."""
    return np.array([np.median(optical_flow(a, b).reshape(-1, 2), axis=0) for a, b in zip(frames, frames[1:])],
                    np.float64)


def camera_error(frames: np.ndarray, cx: float, cy: float) -> dict:
    """Camera error: distance (px/frame) between the measured mean content motion and the motion a pan asks for.

    The shot's convention: the camera travels cx·W (cy·H) over the clip, so content moves −cx·W/(F−1) px per
    frame in x (−cy·H/(F−1) in y). Measured: mean over pairs of `global_motion`. MotionBooth §4 compares flow
    with the requested camera speed (its exact formula not retrieved, METHODS.md §1.4); this is the L2 distance of
    the mean velocities. Returns {"error": px/frame, "relative": error / requested speed (None for no pan),
    "measured": [dx, dy], "requested": [dx, dy]}.
    """
    F, H, W, _ = frames.shape
    if F < 2:
        raise MetricUnavailable("camera error needs at least 2 frames")
    want = np.array([-cx * W / (F - 1), -cy * H / (F - 1)])
    got = global_motion(frames).mean(0)
    err = float(np.linalg.norm(got - want))
    speed = float(np.linalg.norm(want))
    return {"error": err, "relative": err / speed if speed > 0 else None, "measured": got.round(3).tolist(),
            "requested": want.round(3).tolist()}


# --- box adherence (toy world: the subject found by its known colour) ----------------------------------------


def subject_colour(phrase: str) -> str | None:
    """The toy-world colour word of a subject phrase ('yellow star' -> 'yellow'), or None."""
    from studio.toyworld import world

    return next((w for w in phrase.lower().split() if w in world.COLORS), None)


def box_adherence(frames: np.ndarray, phrase: str, boxes: np.ndarray) -> dict:
    """Box adherence: hit rate (share of frames whose subject centroid lies in its box) and mean IoU of the
    subject's bounding box with the requested box; `studio.toyworld.evaluate.box_adherence`, which finds the
    subject by its toy-world colour (MotionBooth's and Direct-A-Video's box metrics use a detector instead; no
    detector weights are available offline, so other subjects are skipped)."""
    from studio.toyworld import evaluate

    colour = subject_colour(phrase)
    if colour is None:
        raise MetricUnavailable(f"box adherence needs a toy-world colour in the phrase {phrase!r} (no subject "
                                f"detector offline)")
    if frames.shape[1] != frames.shape[2]:
        raise MetricUnavailable("box adherence (toy world) needs square frames")
    return evaluate.box_adherence(frames, colour, boxes)
