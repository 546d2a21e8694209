"""Subject masks from photos: a box (or a class word) in, a boolean (H, W) mask out.

Backends, from best to most basic:
  sam               transformers' SamModel (Segment Anything, Kirillov et al. 2023) prompted with the box; weights
                    `facebook/sam-vit-base` from the Hugging Face hub (or a local folder of that format).
  segment-anything  Meta's `segment_anything` package (optional extra `sam`, needs torchvision) with the checkpoint
                    file named by SHOT_STUDIO_SAM_CHECKPOINT (sam_vit_b_01ec64.pth and the like).
  grabcut           OpenCV GrabCut (Rother et al. 2004) initialised from the box: offline, no weights, seeded.
  box               the filled box itself: the last resort.
"auto" uses sam when its weights are already on disk (never downloads), segment-anything when the package imports
and its checkpoint is set, else grabcut, and the box when grabcut's mask is degenerate (empty or the whole box).

Images are (H, W, 3) uint8 RGB; boxes are [x0, y0, x1, y1] fractions of the width and height, 0..1.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from studio.pipelines import ModelLoadError

logger = logging.getLogger(__name__)

SAM_MODEL_ID = "facebook/sam-vit-base"
OWL_MODEL_ID = "google/owlv2-base-patch16-ensemble"
SAM_CHECKPOINT_ENV = "SHOT_STUDIO_SAM_CHECKPOINT"
BACKENDS = ("auto", "sam", "segment-anything", "grabcut", "box")
WORD_BACKENDS = ("auto", "owl", "centre")
CENTRE_BOX = (0.1, 0.1, 0.9, 0.9)  # the inner 80% of the photo: subject photos are framed on the subject
MIN_FILL = 0.02  # a mask covering less of its box than this found nothing
MAX_FILL = 0.97  # ... and more than this did not separate the subject from the box's background
GRABCUT_ITERATIONS = 5
GRABCUT_MAX_SIDE = 512  # GrabCut runs on a copy at most this large; the mask is scaled back up
GRABCUT_SEED = 0
OWL_THRESHOLD = 0.1
MIN_IMAGE_SIDE = 8  # any image the mask code takes; training has its own floor (tune.check_photos)

Box = tuple[float, float, float, float]

_MODELS: dict[tuple[str, str, str], tuple] = {}  # (kind, model id, device) -> (model, processor), filled on first use
_MODELS_LOCK = threading.Lock()


@dataclass
class MaskResult:
    """A subject mask and how it was made."""

    mask: np.ndarray  # (H, W) bool, True on the subject
    backend: str  # the backend that produced the mask: sam | segment-anything | grabcut | box
    note: str = ""  # why a fallback was taken, or what looked wrong; empty when all went as asked
    box: Box = (0.0, 0.0, 1.0, 1.0)  # the box the mask was cut from (segment_word finds one)


# --- validation ----------------------------------------------------------------------------------------------


def _fmt_box(values: Sequence) -> str:
    try:
        return repr([float(v) for v in values])
    except (TypeError, ValueError):
        return repr(list(values))


def check_box(box, field: str = "box") -> Box:
    """Validate a normalized [x0, y0, x1, y1] box; ValueError naming `field` and the value otherwise."""
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if not isinstance(box, (list, tuple)):
        raise ValueError(f"{field}: must be [x0, y0, x1, y1] in 0..1 (got {box!r})")
    if len(box) != 4:
        raise ValueError(f"{field}: must have 4 numbers [x0, y0, x1, y1] (got {len(box)}: {_fmt_box(box)})")
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{field}: must be 4 numbers (got {box!r})")
    values = [float(v) for v in box]
    for label, v in zip(("x0", "y0", "x1", "y1"), values):
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{field}: {label} must be in 0..1 (got {_fmt_box(values)})")
    x0, y0, x1, y1 = values
    if x1 <= x0:
        raise ValueError(f"{field}: x1 must be > x0 (got {_fmt_box(values)})")
    if y1 <= y0:
        raise ValueError(f"{field}: y1 must be > y0 (got {_fmt_box(values)})")
    return x0, y0, x1, y1


def check_image(image, field: str = "image") -> np.ndarray:
    """Validate an (H, W, 3) uint8 RGB image; ValueError naming `field` and what is wrong otherwise."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{field}: must be a numpy array (H, W, 3) of uint8 RGB (got {type(image).__name__})")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = "; drop the alpha channel first" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise ValueError(f"{field}: must have shape (H, W, 3) RGB (got {tuple(image.shape)}){hint}")
    if image.dtype != np.uint8:
        raise ValueError(f"{field}: must be uint8 RGB in 0..255 (got dtype {image.dtype}); "
                         f"convert floats in 0..1 with (x * 255).round().astype(np.uint8)")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f"{field}: must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels "
                         f"(got {image.shape[1]}x{image.shape[0]})")
    return image


def check_mask(mask, shape: tuple[int, int] | None = None, field: str = "mask") -> np.ndarray:
    """Validate an (H, W) mask (bool, or 0/1 or 0/255 integers) and return it as bool."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        got = tuple(mask.shape) if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"{field}: must be a 2-D numpy array (H, W) (got {got})")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"{field}: must match the image's (H, W) {tuple(shape)} (got {tuple(mask.shape)})")
    if mask.dtype == bool:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{field}: must be bool or numeric (got dtype {mask.dtype})")
    if mask.max(initial=0) > 1:
        return mask > 127  # 0..255
    return mask > (0.5 if np.issubdtype(mask.dtype, np.floating) else 0)  # 0..1


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field}: must be one of {', '.join(choices)} (got {value!r})")


def box_to_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1) of a normalized box, x1/y1 exclusive, at least one pixel each way."""
    x0, y0 = min(int(math.floor(box[0] * width)), width - 1), min(int(math.floor(box[1] * height)), height - 1)
    x1, y1 = max(int(math.ceil(box[2] * width)), x0 + 1), max(int(math.ceil(box[3] * height)), y0 + 1)
    return x0, y0, min(x1, width), min(y1, height)


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """(H, W) bool: True inside the box."""
    height, width = shape
    x0, y0, x1, y1 = box_to_pixels(box, width, height)
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- public API ----------------------------------------------------------------------------------------------


def segment(image: np.ndarray, box: Sequence[float], backend: str = "auto", *, sam_model: str = SAM_MODEL_ID,
            device: str | None = None) -> MaskResult:
    """Cut the subject inside `box` out of `image` with a mask backend (see the module docstring).

    Args:
        image: (H, W, 3) uint8 RGB photo.
        box: [x0, y0, x1, y1], fractions of width and height in 0..1, around the subject.
        backend: auto | sam | segment-anything | grabcut | box. A named model backend whose weights cannot be
            loaded raises ModelLoadError; "auto" never downloads and falls back instead.
        sam_model: hub id or local folder of the transformers SAM weights.
        device: torch device for the model backends; None picks cuda when available.
    """
    # 1. Check inputs
    image = check_image(image)
    box = check_box(box)
    _check_choice("backend", backend, BACKENDS)
    # 2. A named backend runs as asked
    if backend != "auto":
        return _run_backend(backend, image, box, sam_model, device)
    # 3. auto: a model already on disk, else grabcut, else the box
    return _segment_auto(image, box, sam_model, device)


def segment_word(image: np.ndarray, word: str, backend: str = "auto", *, mask_backend: str = "auto",
                 owl_model: str = OWL_MODEL_ID, sam_model: str = SAM_MODEL_ID,
                 device: str | None = None) -> MaskResult:
    """Mask the subject named by its class word ("dog"), without a box.

    The box comes from OWLv2 open-vocabulary detection (Minderer et al. 2023) when backend="owl", or when "auto"
    finds its weights already on disk; otherwise (offline, or OWLv2 finds nothing) it is the photo's inner 80%
    (CENTRE_BOX): subject photos are framed on their subject, so GrabCut inside that box usually isolates it.
    The box is then segmented with `segment(..., mask_backend)`.
    """
    image = check_image(image)
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word: must be a non-empty class word such as 'dog' (got {word!r})")
    _check_choice("backend", backend, WORD_BACKENDS)
    _check_choice("mask_backend", mask_backend, BACKENDS)
    box, how = _word_box(image, word.strip(), backend, owl_model, device)
    result = segment(image, box, mask_backend, sam_model=sam_model, device=device)
    note = "; ".join(n for n in (how, result.note) if n)
    return replace(result, note=note, box=box)


# --- auto ----------------------------------------------------------------------------------------------------


def _segment_auto(image: np.ndarray, box: Box, sam_model: str, device: str | None) -> MaskResult:
    notes = []
    for name in _model_backends_on_disk(sam_model):
        try:
            return _run_backend(name, image, box, sam_model, device, local_files_only=True)
        except ModelLoadError as e:
            logger.warning("mask backend %s unavailable, falling back: %s", name, e)
            notes.append(f"{name} unavailable")
    result = _run_backend("grabcut", image, box, sam_model, device)
    if not result.note:
        return replace(result, note="; ".join(notes))
    logger.info("grabcut mask unusable (%s); using the box", result.note)
    return MaskResult(box_mask(image.shape[:2], box), "box", "; ".join(notes + [result.note, "used the box"]), box)


def _model_backends_on_disk(sam_model: str) -> list[str]:
    """The model backends "auto" may use without a download, best first."""
    found = []
    if _weights_on_disk(sam_model):
        found.append("sam")
    if os.environ.get(SAM_CHECKPOINT_ENV) and Path(os.environ[SAM_CHECKPOINT_ENV]).is_file():
        found.append("segment-anything")
    return found


def _weights_on_disk(model_id: str) -> bool:
    """Whether a hub id's config and weights are in the local Hugging Face cache (or `model_id` is a folder)."""
    if Path(model_id).is_dir():
        return (Path(model_id) / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(model_id, filename), str)
        except Exception:  # a malformed id is simply not cached
            return False

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))


def _run_backend(name: str, image: np.ndarray, box: Box, sam_model: str, device: str | None,
                 local_files_only: bool = False) -> MaskResult:
    if name == "box":
        return MaskResult(box_mask(image.shape[:2], box), "box", "", box)
    if name == "grabcut":
        mask, note = grabcut(image, box)
        return MaskResult(mask, "grabcut", note, box)
    if name == "sam":
        return MaskResult(_sam_mask(image, box, sam_model, device, local_files_only), "sam", "", box)
    return MaskResult(_segment_anything_mask(image, box, device), "segment-anything", "", box)


# --- grabcut -------------------------------------------------------------------------------------------------


def grabcut(image: np.ndarray, box: Box, iterations: int = GRABCUT_ITERATIONS,
            max_side: int = GRABCUT_MAX_SIDE) -> tuple[np.ndarray, str]:
    """GrabCut (Rother et al. 2004) from a box: ((H, W) bool mask, note); the note is empty unless it degenerated.

    Deterministic: OpenCV's RNG (GrabCut's k-means initialisation of the colour GMMs) is seeded before the call.
    """
    import cv2

    image, box = check_image(image), check_box(box)
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = image
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)  # (h, w, 3)
    h, w = small.shape[:2]
    x0, y0, x1, y1 = box_to_pixels(box, w, h)
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return np.zeros((height, width), bool), "box covers the whole image, so GrabCut has no background to learn"
    labels = np.zeros((h, w), np.uint8)
    bgd_model, fgd_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(GRABCUT_SEED)
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, (x0, y0, x1 - x0, y1 - y0),
                    bgd_model, fgd_model, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error as e:  # too few pixels on one side of the box to fit its colour model
        return np.zeros((height, width), bool), f"GrabCut failed ({str(e).strip().splitlines()[-1][:120]})"
    fg = _drop_specks((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD))  # (h, w)
    if scale < 1.0:
        fg = cv2.resize(fg.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR) > 127
    return fg, _degenerate(fg, box)


def _drop_specks(mask: np.ndarray, keep_fraction: float = 0.05) -> np.ndarray:
    """Remove connected pieces smaller than `keep_fraction` of the largest piece."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
    keep = np.flatnonzero(areas >= keep_fraction * areas.max()) + 1
    return np.isin(labels, keep)


def _degenerate(mask: np.ndarray, box: Box) -> str:
    """Why a mask is no use as a subject mask ('' when it is fine)."""
    area = box_mask(mask.shape, box).sum()
    fill = float(mask.sum()) / max(int(area), 1)
    if fill < MIN_FILL:
        return f"GrabCut found almost nothing in the box ({fill:.1%} of it)"
    if fill > MAX_FILL:
        return f"GrabCut kept almost the whole box ({fill:.1%} of it)"
    return ""


# --- model backends ------------------------------------------------------------------------------------------


def _load_error(model_id: str, err: Exception) -> ModelLoadError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"mask model '{model_id}' could not be loaded ({reason}); it is fetched from the Hugging Face hub on first "
        f"use: without network, run `hf download {model_id}` where you have one and point HF_HOME at that cache, "
        f"or use backend='grabcut' (offline, no weights)")


def _from_pretrained(kind: str, model_id: str, device: str, local_files_only: bool) -> tuple:
    import transformers

    model_cls, processor_cls = {
        "sam": (transformers.SamModel, transformers.SamProcessor),
        "owl": (transformers.Owlv2ForObjectDetection, transformers.Owlv2Processor),
    }[kind]
    try:
        processor = processor_cls.from_pretrained(model_id, local_files_only=local_files_only)
        model = model_cls.from_pretrained(model_id, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(model_id, e) from None
    except Exception as e:  # huggingface_hub's HTTP and offline errors have their own hierarchy
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _load_error(model_id, e) from None
        raise
    return model.to(device).eval(), processor


def load_model(kind: str, model_id: str, device: str | None = None, local_files_only: bool = False) -> tuple:
    """(model, processor) of a transformers mask model ("sam" or "owl"), loaded once per (kind, id, device)."""
    from studio.pipelines import pick_device

    device = device or pick_device()
    key = (kind, model_id, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            logger.info("loading %s mask model %s on %s", kind, model_id, device)
            _MODELS[key] = _from_pretrained(kind, model_id, device, local_files_only)
        return _MODELS[key]


def _sam_mask(image: np.ndarray, box: Box, model_id: str, device: str | None, local_files_only: bool) -> np.ndarray:
    """SAM's mask for a box prompt through transformers' SamModel."""
    import torch
    from PIL import Image

    model, processor = load_model("sam", model_id, device, local_files_only)
    height, width = image.shape[:2]
    pixel_box = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    inputs = processor(images=Image.fromarray(image), input_boxes=[[pixel_box]], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"].to(model.device),
                    input_boxes=inputs["input_boxes"].to(model.device), multimask_output=False)
    masks = processor.image_processor.post_process_masks(
        out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])  # [(1, 1, H, W) bool]
    return np.asarray(masks[0][0, 0], dtype=bool)


def _segment_anything_mask(image: np.ndarray, box: Box, device: str | None) -> np.ndarray:
    """SAM's mask for a box prompt through Meta's segment_anything package and a local checkpoint."""
    checkpoint = os.environ.get(SAM_CHECKPOINT_ENV, "")
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError as e:
        raise ModelLoadError(f"backend 'segment-anything' needs the segment_anything package, which did not import "
                             f"({e}); install the 'sam' extra (it needs torchvision) or use backend='sam'") from None
    if not checkpoint or not Path(checkpoint).is_file():
        raise ModelLoadError(f"backend 'segment-anything' needs a checkpoint file in {SAM_CHECKPOINT_ENV} "
                             f"(got {checkpoint!r}), e.g. sam_vit_b_01ec64.pth")
    from studio.pipelines import pick_device

    variant = next((v for v in ("vit_h", "vit_l", "vit_b") if v in Path(checkpoint).name), "vit_b")
    predictor = _segment_anything_predictor(variant, checkpoint, device or pick_device(), sam_model_registry,
                                            SamPredictor)
    height, width = image.shape[:2]
    predictor.set_image(image, image_format="RGB")
    masks, _, _ = predictor.predict(box=np.array(box_to_pixels(box, width, height), float), multimask_output=False)
    return np.asarray(masks[0], dtype=bool)  # masks: (1, H, W)


def _segment_anything_predictor(variant: str, checkpoint: str, device: str, registry, predictor_cls):
    key = ("segment-anything", f"{variant}:{checkpoint}", device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                sam = registry[variant](checkpoint=checkpoint)  # the package reads its own .pth format
            except Exception as e:
                raise ModelLoadError(f"segment-anything checkpoint {checkpoint} could not be loaded "
                                     f"as {variant} ({str(e)[:200]})") from None
            _MODELS[key] = (predictor_cls(sam.to(device)), None)
        return _MODELS[key][0]


def _word_box(image: np.ndarray, word: str, backend: str, owl_model: str, device: str | None) -> tuple[Box, str]:
    """The box of the subject named by `word`, and a note on how it was found."""
    if backend == "centre":
        return CENTRE_BOX, "centre box"
    if backend == "auto" and not _weights_on_disk(owl_model):
        return CENTRE_BOX, "centre box (OWLv2 weights not on disk)"
    try:
        found = owl_box(image, word, owl_model, device, local_files_only=backend == "auto")
    except ModelLoadError as e:
        if backend == "owl":
            raise
        logger.warning("OWLv2 unavailable, using the centre box: %s", e)
        return CENTRE_BOX, "centre box (OWLv2 unavailable)"
    if found is None:
        return CENTRE_BOX, f"centre box (OWLv2 found no '{word}')"
    return found, "OWLv2 box"


def owl_box(image: np.ndarray, word: str, model_id: str = OWL_MODEL_ID, device: str | None = None,
            threshold: float = OWL_THRESHOLD, local_files_only: bool = False) -> Box | None:
    """The best-scoring OWLv2 detection of "a photo of a <word>" as a normalized box, or None if none passes."""
    import torch
    from PIL import Image

    model, processor = load_model("owl", model_id, device, local_files_only)
    height, width = image.shape[:2]
    inputs = processor(text=[[f"a photo of a {word}"]], images=Image.fromarray(image), return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in inputs.items()})
    # OWLv2 pads the photo to a square; post-processing scales the boxes back to the original (height, width).
    found = processor.post_process_grounded_object_detection(out, threshold=threshold,
                                                             target_sizes=[(height, width)])[0]
    if len(found["scores"]) == 0:
        return None
    x0, y0, x1, y1 = found["boxes"][int(found["scores"].argmax())].tolist()
    box = (x0 / width, y0 / height, x1 / width, y1 / height)
    box = tuple(min(max(v, 0.0), 1.0) for v in box)
    return box if box[2] > box[0] and box[3] > box[1] else None


# --- files and previews --------------------------------------------------------------------------------------


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write a mask as a grayscale PNG, 255 on the subject and 0 elsewhere."""
    from PIL import Image

    mask = check_mask(mask)
    path = Path(path)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")
    return path


def load_mask(path: str | Path) -> np.ndarray:
    """(H, W) bool mask from a PNG (any gray level above 127 is the subject)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 64, 64),
            alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 preview: the subject tinted with `color` and outlined, the rest dimmed."""
    import cv2

    image = check_image(image)
    mask = check_mask(mask, image.shape[:2])
    out = image.astype(np.float32)
    tint = np.asarray(color, np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * tint
    out[~mask] *= 0.6
    out = out.round().clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(min(image.shape[:2]) / 200))
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out
