"""Measure the embedded model's gates on held-out seeds: does a rendered clip show what its caption says?

Checks (each a pure function of uint8 frames, scoring ~100% on ground-truth clips of the world):
- background: the median colour of the frames, nearest background prototype (subjects cover < 20% of a frame);
- colour: the subject colour with the most pixels near its RGB value (and away from the background's);
- direction: the displacement of that colour's centroid from the first to the last frames, its dominant axis;
- binding: the subject phrase's cross-attention mass inside the true mask, over the mask's area fraction
  (1 = no binding; the trained STCA loss should push it well above);
- render time: 8 frames at native size with guidance, through the ordinary engine path.

Shapes: F frames, S×S pixels.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from studio.toyworld import world

logger = logging.getLogger(__name__)

GATES = {"colour": 0.80, "background": 0.90, "direction": 0.60, "binding_ratio": 2.0, "render_s": 3.0}
CHANCE = {"colour": 1 / len(world.COLORS), "background": 1 / len(world.BACKGROUNDS),
          "direction": 1 / len(world.MOTIONS)}
_COLOUR_TOL = 70.0  # RGB distance within which a pixel counts as a subject colour
_MIN_PIXELS = 3  # per frame, for a centroid


def _dist(frames: np.ndarray, rgb) -> np.ndarray:
    """(F, S, S) Euclidean RGB distance of every pixel to one colour."""
    return np.linalg.norm(frames.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)


@functools.cache
def background_prototypes() -> dict[str, tuple[float, float, float]]:
    """Per background, the median colour of the world's own empty clips of it (a few seeds)."""
    out = {}
    for bg in world.BACKGROUNDS:
        pixels = np.concatenate([world.render_clip(bg, [], seed=s).frames.reshape(-1, 3) for s in range(4)])
        out[bg] = tuple(float(v) for v in np.median(pixels.astype(np.float32), axis=0))
    return out


def classify_background(frames: np.ndarray) -> str:
    med = np.median(frames.reshape(-1, 3).astype(np.float32), axis=0)
    protos = background_prototypes()
    return min(protos, key=lambda k: np.linalg.norm(med - np.asarray(protos[k], np.float32)))


def colour_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per subject colour, the (F, S, S) pixels nearer to it than to any other subject colour or background."""
    names = list(world.COLORS)
    protos = [world.COLORS[c] for c in names] + list(background_prototypes().values())
    d = np.stack([_dist(frames, p) for p in protos])  # (colours + backgrounds, F, S, S)
    nearest = d.argmin(0)
    return {c: (nearest == i) & (d[i] < _COLOUR_TOL) for i, c in enumerate(names)}


def classify_colour(frames: np.ndarray) -> str | None:
    counts = {c: int(m.sum()) for c, m in colour_masks(frames).items()}
    best = max(counts, key=counts.get)
    return best if counts[best] >= _MIN_PIXELS * len(frames) // 2 else None


def _pixels_of(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(F, S, S) pixels of one subject colour, or of any of several (a two-colour pattern)."""
    cm = colour_masks(frames)
    return cm[colour] if isinstance(colour, str) else np.any([cm[c] for c in colour], 0)


def subject_track(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(F, 2) centroid x, y of the colour's pixels per frame (NaN where too few)."""
    m = _pixels_of(frames, colour)
    out = np.full((len(frames), 2), np.nan, np.float32)
    for f in range(len(frames)):
        ys, xs = np.nonzero(m[f])
        if len(xs) >= _MIN_PIXELS:
            out[f] = xs.mean(), ys.mean()
    return out


def classify_direction(frames: np.ndarray, colour: str, min_travel: float = 2.0) -> str | None:
    """left/right/up/down from the centroid's travel between the first and last thirds of the clip."""
    track = subject_track(frames, colour)
    n = max(1, len(frames) // 3)
    a, b = np.nanmean(track[:n], 0), np.nanmean(track[-n:], 0)
    if np.isnan(a).any() or np.isnan(b).any():
        return None
    dx, dy = b - a
    if max(abs(dx), abs(dy)) < min_travel:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def eval_prompts(n: int, seed: int = 0) -> list[dict]:
    """n held-out single-subject prompts with a named motion: colour, shape, motion, background, caption."""
    rng = np.random.default_rng([seed, 77])
    out = []
    for i in range(n):
        c = list(world.COLORS)[i % len(world.COLORS)]  # colours and motions balanced, the rest drawn
        s = world.SHAPES[rng.integers(len(world.SHAPES))]
        m = world.MOTIONS[(i // len(world.COLORS)) % len(world.MOTIONS)]
        bg = world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))]
        out.append({"colour": c, "shape": s, "motion": m, "background": bg,
                    "caption": f"a {c} {s} moving {m} on {bg}", "seed": world.EVAL_SEED_OFFSET + seed * 10_000 + i})
    return out


def ground_truth_clip(p: dict) -> world.Clip:
    """The world's own clip for an eval prompt (what a perfect model would render)."""
    rng = np.random.default_rng([p["seed"], 5])
    radius = float(rng.uniform(4.5, 7.0))
    path = world.make_path(p["motion"], radius, rng)
    subject = world.SubjectSpec(p["colour"], p["shape"], radius, path, p["motion"])
    return world.render_clip(p["background"], [subject], seed=p["seed"])


def score_clip(frames: np.ndarray, p: dict) -> dict:
    colour = classify_colour(frames)
    direction = classify_direction(frames, colour) if colour else None
    return {"background": classify_background(frames) == p["background"], "colour": colour == p["colour"],
            "direction": direction == p["motion"], "seen": {"colour": colour, "direction": direction,
                                                          "background": classify_background(frames)}}


def score_ground_truth(n: int = 48, seed: int = 0) -> dict:
    """The checks on the world's own clips: how far the eval can be trusted (should be ~1.0)."""
    rows = [score_clip(ground_truth_clip(p).frames, p) for p in eval_prompts(n, seed)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "background", "direction")}


def attention_binding(pipe, prompts: list[dict], t_frac: float = 0.5) -> float:
    """Mean over prompts of (phrase attention mass inside the true mask) / (mask area fraction).

    The ground-truth clip is encoded, noised to timestep t_frac·T, and passed through the UNet with its caption;
    every spatial cross-attention layer's map for the phrase tokens (heads averaged, tokens summed, renormalised
    over pixels) is resized to S×S and compared with the mask.
    """
    import torch
    import torch.nn.functional as F

    from studio.controls.base import capture_cross_attention
    from studio.toyworld.train import phrase_token_positions, to_pixels

    unet, vae, tok, te = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    dtype = unet.dtype
    store: list = []
    orig = capture_cross_attention(unet, store)
    ratios = []
    try:
        for p in prompts:
            clip = ground_truth_clip(p)
            gen = torch.Generator().manual_seed(p["seed"])
            ids = tok(p["caption"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            pos = phrase_token_positions(ids[0].tolist(),
                                         tok(f"{p['colour']} {p['shape']}", add_special_tokens=False).input_ids)
            with torch.no_grad():
                x = to_pixels(clip.frames).to(dtype)  # (F, 3, S, S)
                z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # (F, C, h, w)
                z0 = z0.transpose(0, 1)[None]  # (1, C, F, h, w)
                t = int(t_frac * (pipe.scheduler.config.num_train_timesteps - 1))
                a = pipe.scheduler.alphas_cumprod[t].to(dtype)
                zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=gen).to(dtype)
                text = te(ids)[0].to(dtype).repeat_interleave(z0.shape[2], 0)  # (F, L, D)
                store.clear()
                unet(zt, torch.tensor([t]), encoder_hidden_states=text)
            mask = torch.from_numpy(clip.masks[0].astype(np.float32))  # (F, S, S)
            maps = []
            for probs in store:  # (F, N, L)
                side = int(math.isqrt(probs.shape[1]))
                m = probs[..., pos].sum(-1).float().view(-1, 1, side, side)  # (F, 1, side, side)
                m = F.interpolate(m, size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                maps.append(m / m.sum((-2, -1), keepdim=True).clamp_min(1e-12))
            attn = torch.stack(maps).mean(0)  # (F, S, S), sums to 1 per frame
            inside = (attn * mask).sum((-2, -1))  # (F,)
            area = mask.mean((-2, -1)).clamp_min(1e-6)
            ratios.append(float((inside / area).mean()))
    finally:
        unet.set_attn_processor(orig)
        store.clear()
    return float(np.mean(ratios))


def _preset_file(model_dir: Path, folder: Path) -> Path:
    """A model preset for a model folder, so the eval renders through the ordinary engine path.

    The size and size multiple come from the folder's VAE and UNet configs; fps, steps and guidance from the
    toyworld preset.
    """
    import json

    from omegaconf import OmegaConf

    from studio.presets import load_model_preset

    idx = json.loads((model_dir / "model_index.json").read_text())
    if "AnimateDiff" not in idx.get("_class_name", ""):
        raise ValueError(f"{model_dir} is not an AnimateDiff diffusers folder")
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)  # as diffusers' vae_scale_factor
    size = int(unet["sample_size"]) * vae_factor  # the UNet's latent size, in pixels
    multiple = vae_factor * 2 ** (len(unet["block_out_channels"]) - 1)  # the UNet halves the latent per down block
    d = load_model_preset("toyworld").defaults
    preset = {"name": "eval", "family": "animatediff", "base": str(model_dir.resolve()),
              "defaults": {"frames": world.FRAMES, "width": size, "height": size, "fps": d.fps, "steps": d.steps,
                           "guidance_scale": d.guidance_scale},
              "size_multiple": multiple, "max_size": 4 * size,
              "max_frames": int(unet.get("motion_max_seq_length", 32))}
    path = folder / "eval-model.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(preset)))
    return path


def evaluate(model_dir: str | Path = "models/toyworld", n: int = 48, seed: int = 0, binding_n: int = 16,
             steps: int = 20, guidance_scale: float = 7.5, threads: int = 2) -> dict:
    """Render n held-out prompts through the engine and score them; measure binding and render time.

    The render-time gate is for `threads` CPU threads (torch.set_num_threads; 0 leaves torch's default); the
    previous thread count is restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _evaluate(Path(model_dir), n, seed, binding_n, steps, guidance_scale)
        result["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return result


def _evaluate(model_dir: Path, n: int, seed: int, binding_n: int, steps: int, guidance_scale: float) -> dict:
    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager

    manager = PipelineManager(max_pipelines=1, device="cpu")
    prompts = eval_prompts(n, seed)
    rows, times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        preset = _preset_file(model_dir, Path(tmp))
        for i, p in enumerate(prompts):
            shot = shotlib.from_container({"model": str(preset), "prompt": p["caption"], "seed": p["seed"],
                                           "steps": steps, "guidance_scale": guidance_scale})
            r = engine.render(shot, manager)
            if i > 0:  # the first render includes loading
                times.append(r.timings["total"])
            rows.append({**p, **score_clip(r.frames, p)})
            logger.info("eval %d/%d %s -> %s", i + 1, n, p["caption"], rows[-1]["seen"])
        pipe = manager.get(engine.prepare(shot)[1])
        binding = attention_binding(pipe, prompts[:binding_n])
    result = {
        "model": str(model_dir), "n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
        "colour": float(np.mean([r["colour"] for r in rows])),
        "background": float(np.mean([r["background"] for r in rows])),
        "direction": float(np.mean([r["direction"] for r in rows])),
        "binding_ratio": binding,
        "render_s": float(np.median(times)) if times else float("nan"),
        "ground_truth": score_ground_truth(n, seed),
        "chance": CHANCE, "gates": GATES,
        "rows": rows,
    }
    result["passed"] = {k: (result[k] < g if k == "render_s" else result[k] >= g) for k, g in GATES.items()}
    return result


def format_report(result: dict) -> str:
    lines = [f"toy-world eval of {result['model']}: {result['n']} held-out prompts, {result['steps']} steps, "
             f"guidance {result['guidance_scale']}", "",
             "| check | measured | gate | chance | ground truth | pass |", "|---|---|---|---|---|---|"]
    for k in ("colour", "background", "direction"):
        lines.append(f"| {k} right | {result[k]:.2f} | ≥ {GATES[k]:.2f} | {CHANCE[k]:.2f} | "
                     f"{result['ground_truth'][k]:.2f} | {'yes' if result['passed'][k] else 'NO'} |")
    lines.append(f"| phrase attention in mask / area | {result['binding_ratio']:.2f} | ≥ {GATES['binding_ratio']:.1f}"
                 f" | 1.00 | – | {'yes' if result['passed']['binding_ratio'] else 'NO'} |")
    lines.append(f"| render 8 frames, native size (s) | {result['render_s']:.2f} | < {GATES['render_s']:.1f} | – | – "
                 f"| {'yes' if result['passed']['render_s'] else 'NO'} |")
    return "\n".join(lines)


# --- control checks (known colours of the toy world; used by the control tests and the eval harness) ----------


def subject_boxes(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(F, 4) normalised bounding box of the colour's pixels per frame (NaN where fewer than a few pixels)."""
    m = _pixels_of(frames, colour)
    size = frames.shape[1]
    out = np.full((len(frames), 4), np.nan, np.float32)
    for f in range(len(frames)):
        ys, xs = np.nonzero(m[f])
        if len(xs) >= _MIN_PIXELS:
            out[f] = xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size
    return out


def box_adherence(frames: np.ndarray, colour: str | tuple, boxes: np.ndarray) -> dict:
    """Hit rate (frames whose subject centroid lies in the requested box) and mean IoU with the requested box."""
    track = subject_track(frames, colour) / frames.shape[1]  # (F, 2) normalised
    found = subject_boxes(frames, colour)
    hits, ious = [], []
    for f, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy = track[f]
        hits.append(bool(x0 <= cx <= x1 and y0 <= cy <= y1) if not np.isnan(cx) else False)
        g = found[f]
        if np.isnan(g).any():
            ious.append(0.0)
            continue
        iw = max(0.0, min(x1, g[2]) - max(x0, g[0]))
        ih = max(0.0, min(y1, g[3]) - max(y0, g[1]))
        inter = iw * ih
        ious.append(inter / ((x1 - x0) * (y1 - y0) + (g[2] - g[0]) * (g[3] - g[1]) - inter))
    return {"hit_rate": float(np.mean(hits)), "iou": float(np.mean(ious))}


def global_shift(frames: np.ndarray, max_shift: int = 4) -> np.ndarray:
    """(F-1, 2) content motion (dx, dy) in whole pixels between consecutive frames.

    Exhaustive search over shifts in ±max_shift: the shift minimising the median absolute difference over the
    overlap. The median ignores a subject that moves differently from the background (it covers < 20% of a frame).
    """
    f = frames.astype(np.float32)
    _, h, w, _ = f.shape
    m = max_shift
    out = []
    for a, b in zip(f, f[1:]):
        best, arg = np.inf, (0, 0)
        core = b[m:h - m, m:w - m]  # (h-2m, w-2m, 3)
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                # content moved by (dx, dy): b[y, x] == a[y - dy, x - dx]
                ref = a[m - dy:h - m - dy, m - dx:w - m - dx]
                err = np.median(np.abs(core - ref).sum(-1))
                if err < best:
                    best, arg = err, (dx, dy)
        out.append(arg)
    return np.array(out, np.float32)


# --- the controls on the toy-world model (measured by `studio toyworld eval --controls` and the tests) ---------

LEFT_TO_RIGHT = {0: [0.0, 0.25, 0.45, 0.75], 7: [0.55, 0.25, 1.0, 0.75]}
TWO_TRACKS = {"red square": {0: [0.55, 0.0, 1.0, 0.45], 7: [0.0, 0.0, 0.45, 0.45]},
              "yellow star": {0: [0.0, 0.55, 0.45, 1.0], 7: [0.55, 0.55, 1.0, 1.0]}}


def _render(manager, model: str, **fields) -> np.ndarray:
    from studio import engine, shot as shotlib

    return engine.render(shotlib.from_container({"model": model, **fields}), manager).frames


def measure_box_control(manager, model: str = "toyworld", seeds=range(8)) -> dict:
    """A yellow star on sky with a left-to-right track, with and without box control: hit rate and IoU."""
    from studio.controls.boxes import interpolate

    boxes = interpolate(LEFT_TO_RIGHT, world.FRAMES)
    out = {}
    for on in (True, False):
        subjects = [{"phrase": "yellow star", "boxes": LEFT_TO_RIGHT}] if on else []
        rows = [box_adherence(_render(manager, model, prompt="a yellow star on sky", seed=s, subjects=subjects),
                              "yellow", boxes) for s in seeds]
        out["with" if on else "without"] = {k: float(np.mean([r[k] for r in rows])) for k in ("hit_rate", "iou")}
    return out


def measure_two_subjects(manager, model: str = "toyworld", seeds=range(6)) -> dict:
    """A red square and a yellow star crossing on opposite tracks: each one's hit rate in its own box."""
    from studio.controls.boxes import interpolate

    hits: dict[str, list] = {p: [] for p in TWO_TRACKS}
    for s in seeds:
        frames = _render(manager, model, prompt="a red square and a yellow star on sky", seed=s,
                         subjects=[{"phrase": p, "boxes": b} for p, b in TWO_TRACKS.items()])
        for p, b in TWO_TRACKS.items():
            hits[p].append(box_adherence(frames, p.split()[0], interpolate(b, world.FRAMES))["hit_rate"])
    return {p: float(np.mean(v)) for p, v in hits.items()}


def measure_camera(manager, cx: float, cy: float, model: str = "toyworld", seeds=range(4),
                   prompt: str = "a white circle on sand") -> dict:
    """A pan of `prompt` per seed, each render measured on its own (its sidecar `measures`, studio.measures: the
    background's motion, subjects left out): the mean content motion (dx, dy) px/frame, each render's ratio of
    achieved to requested motion along it, and the share of renders at >= half the request."""
    from studio import engine, shot as shotlib

    rows = [engine.render(shotlib.from_container({"model": model, "prompt": prompt, "seed": s,
                                                  "camera": {"cx": cx, "cy": cy}}), manager).measures["camera"]
            for s in seeds]
    return {"motion": [float(v) for v in np.mean([r["achieved"] for r in rows], 0)],
            "ratios": [r["ratio"] for r in rows], "took": float(np.mean([r["took"] for r in rows]))}


def reference_image(path) -> str:
    """A purple circle on grass, the toy world's own drawing, saved as a PNG reference."""
    from PIL import Image

    spec = world.SubjectSpec("purple", "circle", 8.0, np.array([[16.0, 16.0]] * world.FRAMES), None)
    Image.fromarray(world.render_clip("grass", [spec], seed=1).frames[0]).save(path)
    return str(path)


def measure_reference(manager, reference: str, strength: float = 10.0, model: str = "toyworld",
                      seeds=range(6)) -> dict:
    """'a circle on grass' (no colour named) without and with a purple-circle reference on the phrase "circle":
    per case, the fraction of pixels of the reference's colour ("purple") and of any subject colour ("subject")."""
    def fractions(subjects):
        masks = [colour_masks(_render(manager, model, prompt="a circle on grass", seed=s, subjects=subjects))
                 for s in seeds]
        return {"purple": float(np.mean([m["purple"].mean() for m in masks])),
                "subject": float(np.mean([np.any(list(m.values()), 0).mean() for m in masks]))}

    return {"without": fractions([]),
            "with": fractions([{"phrase": "circle", "reference": reference, "reference_strength": strength}])}


def subject_photos(look: str = "halves", shape: str = "star", n: int = 4) -> tuple[list, list]:
    """n photos of a personal subject (a look the model never saw: world.HALVES or world.PATTERNS) on varied
    backgrounds, with true masks."""
    spots = [("grass", 12, 14), ("sand", 20, 18), ("sky", 16, 12), ("grass", 18, 20), ("sand", 14, 20)]
    photos, masks = [], []
    for i, (bg, x, y) in enumerate((spots * 2)[:n]):
        spec = world.SubjectSpec(look, shape, 8.0, np.array([[x, y]] * world.FRAMES, np.float32), None)
        clip = world.render_clip(bg, [spec], seed=100 + i)
        photos.append(clip.frames[0])
        masks.append(clip.masks[0, 0])
    return photos, masks


def colour_histogram(frames: np.ndarray) -> np.ndarray:
    """(4,) share of each subject colour (world.COLORS order) among the subject-coloured pixels."""
    cm = colour_masks(frames)
    counts = np.array([cm[c].sum() for c in world.COLORS], np.float64)
    return counts / max(counts.sum(), 1.0)


def colour_balance(frames: np.ndarray, colours: tuple[str, str]) -> float:
    """2·min(a, b) / (a + b) of the pixels of two subject colours: 1 = both in equal shares (a two-colour subject
    like the photos of a personal look), 0 = one of them only (every subject the words of this world can name)."""
    cm = colour_masks(frames)
    a, b = (float(cm[c].sum()) for c in colours)
    return 2 * min(a, b) / max(a + b, 1.0)


def measure_controls(model_dir: str | Path = "models/toyworld") -> dict:
    """Every control measurement on a model folder (through a preset written for it, like `evaluate`)."""
    from studio.pipelines import PipelineManager

    manager = PipelineManager(max_pipelines=1, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(_preset_file(Path(model_dir), Path(tmp)))
        ref = reference_image(Path(tmp) / "purple.png")
        return {"box": measure_box_control(manager, model), "two_subjects": measure_two_subjects(manager, model),
                "camera": {f"{cx},{cy}": measure_camera(manager, cx, cy, model)
                           for cx, cy in ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5))},
                "reference": measure_reference(manager, ref, model=model)}


def model_card(result: dict, model_dir: str | Path, hardware: str, train_seconds: float | None = None) -> str:
    """The model folder's README: data, architecture, training run and the measured gates (from `result`)."""
    import json

    from studio.toyworld.train import reproduce_command

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    cfg = info["config"]
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    te = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    sizes = {p.parent.name: p.stat().st_size for p in model_dir.rglob("*.safetensors")}
    hours = f"{train_seconds / 3600:.1f} h" if train_seconds else "see training.json"
    failed = [k for k, ok in result["passed"].items() if not ok]
    verdict = ("All gates pass." if not failed else
               f"Gates not reached by this run: {', '.join(failed)}. The eval keeps them, so a longer training "
               f"run (`studio toyworld train` resumes) can pass them.")
    lines = [
        "# toyworld: the Shot Studio embedded model", "",
        "A tiny text-to-video model in the AnimateDiff layout (diffusers format), trained by this project on its "
        "synthetic toy world so the studio runs, and its controls can be tested, on a CPU with no download. "
        "Load it like any AnimateDiff folder: `AnimateDiffPipeline.from_pretrained(\"models/toyworld\")`, or use "
        "the `toyworld` preset.", "",
        "## Data", "",
        "Clips generated on the fly by `studio/toyworld/world.py` (deterministic by seed): 8 frames of 32×32 "
        "pixels; backgrounds grass (textured green), sand (textured beige), sky (blue gradient with clouds); "
        "one subject (75%) or two (25%): circle, square, triangle or star in red, yellow, white or purple; motion "
        "left/right/up/down named in the caption (\"a red circle moving right on grass\"), or still / a free path "
        "with no motion word (25%), or a camera pan over the background (15%, the subject still in the world); "
        "per-frame masks and boxes. Personal looks (checkered, striped) and trigger words (sks, zorb, blick) "
        "never appear in training captions. Held-out evaluation seeds start at 10⁹; training seeds stay below.", "",
        "## Architecture", "",
        f"- VAE: AutoencoderKL, channels {vae['block_out_channels']}, 4 latent channels, factor 2 "
        f"(32×32 → 16×16), scaling factor {vae['scaling_factor']:.4f}; trained first for {info['vae_steps']} steps "
        f"with the loss weighted ×{1 + cfg['vae_subject_weight']:.0f} on subject pixels.",
        f"- UNet: UNetMotionModel from a UNet2DConditionModel with channels {unet['block_out_channels']}, one "
        f"layer per block, {unet['motion_num_attention_heads']} heads, cross-attention dim "
        f"{unet['cross_attention_dim']}, motion modules of up to {unet['motion_max_seq_length']} frames.",
        f"- Text: CLIPTextModel, hidden {te['hidden_size']} × {te['num_hidden_layers']} layers; CLIPTokenizer "
        "with a vocabulary built by the project in which every world word is one token.",
        "- Scheduler: DDIM, linear β 0.00085–0.012, 1000 steps, ε-prediction.",
        f"- Weights: fp16 safetensors, {sum(sizes.values()) / 2**20:.1f} MB "
        f"({', '.join(f'{k} {v / 2**20:.1f} MB' for k, v in sorted(sizes.items()))}).", "",
        "## Training", "",
        f"- {info['t2v_steps']} text-to-video steps at batch {cfg['batch']} clips, AdamW lr {cfg['lr']} "
        f"(warm-up {cfg['warmup']}), caption dropout {cfg['p_uncond']} for guidance, EMA {cfg['ema_decay']}; "
        f"UNet and text encoder trained together; seed {cfg['seed']}.",
        f"- Loss: ε-MSE + {cfg['stca_weight']} × STCA (MotionBooth's subject-token cross-attention loss: BCE "
        "between each subject phrase's spatial cross-attention map and its true mask), which binds the subject "
        "words to where the subject is, so box control by cross-attention editing works on this model.",
        f"- Hardware: {hardware}; wall clock {hours}.",
        f"- Reproduce: `mkdir -p runs && {reproduce_command(info)} > runs/train.log 2>&1` (the recorded "
        "settings, with the step count reached as --steps so that the steps and not the clock end the run; "
        "resumable; floating-point results depend on the torch build and thread count), then `studio toyworld eval --model runs/toyworld/model`. Continue training this model "
        "instead: `studio toyworld train --init models/toyworld --budget SECONDS`.", "",
        "## Measured gates", "",
        format_report(result), "",
        verdict, "",
        "Checks: colour = the subject colour with most pixels; background = nearest background to the median "
        "colour; direction = the subject colour's centroid travel between the first and last thirds of the clip; "
        "binding = attention mass of the phrase inside the true mask over the mask's area (1 = unbound). The "
        "\"ground truth\" column is the same checks on the world's own clips.", "",
        "## Limits", "",
        "Only this world's words mean anything to it. 32×32 pixels. Shape is learned less well than colour and "
        "background. Not for anything but demos, tests and CPU-only use of the studio.",
    ]
    return "\n".join(lines) + "\n"


# --- likeness of a taught subject (benchmarks/likeness.py, tests/test_subject_semantic.py) -----------------------

# The looks the world never shows, as a subject's photos (world.HALVES, world.PATTERNS painted on a star).
LOOKS = {"two-tone": "halves", "striped": "striped", "checkered": "checkered"}
LIKENESS_SHAPE = "star"
_BACKGROUND_TOL = 60.0  # RGB distance from its row's background beyond which a pixel in the box is the subject


def _directions(n: int = 32) -> np.ndarray:
    """(n, 3) fixed unit directions in RGB for the sliced distance (the same in every call)."""
    d = np.random.default_rng(0).normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def sliced_distance(a: np.ndarray, b: np.ndarray, quantiles: int = 64) -> float:
    """Sliced Wasserstein-1 distance between two colour sets (n, 3) and (m, 3) in 0..255, in units of 0..1: the
    mean over fixed directions of the distance between the projected colours' distributions. Proportions count: a
    one-colour subject is half the distance between its two colours away from photos half of each colour."""
    q = (np.arange(quantiles) + 0.5) / quantiles
    dirs = _directions()
    pa = np.quantile(a.astype(np.float64) / 255.0 @ dirs.T, q, axis=0)  # (quantiles, directions)
    pb = np.quantile(b.astype(np.float64) / 255.0 @ dirs.T, q, axis=0)
    return float(np.abs(pa - pb).mean())


def photo_colours(photos: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """(n, 3) the subject's pixels of all photos (their true masks)."""
    return np.concatenate([p[m] for p, m in zip(photos, masks)])


def subject_pixels(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n, 3) the pixels inside each frame's box (F, 4 normalised) that are not background: farther than
    _BACKGROUND_TOL from the median of the same row's pixels outside the box (the sky is a vertical gradient).
    A render with almost nothing in its boxes gives all the boxes' pixels (background included: far from a
    subject's colours)."""
    F, S = frames.shape[:2]
    picked, everything = [], []
    for f in range(F):
        x0, y0, x1, y1 = boxes[f]
        c0, c1 = int(np.floor(x0 * S)), int(np.ceil(x1 * S))
        r0, r1 = int(np.floor(y0 * S)), int(np.ceil(y1 * S))
        inside = np.zeros((S, S), bool)
        inside[r0:r1, c0:c1] = True
        img = frames[f].astype(np.float32)
        for y in range(r0, r1):
            out = img[y][~inside[y]]
            if len(out) == 0:
                continue
            bg = np.median(out, axis=0)
            row = img[y, c0:c1]
            everything.append(row)
            picked.append(row[np.linalg.norm(row - bg, axis=-1) > _BACKGROUND_TOL])
    sel = np.concatenate(picked) if picked else np.zeros((0, 3), np.float32)
    if len(sel) < _MIN_PIXELS * F:
        return np.concatenate(everything)
    return sel


def measure_likeness(manager, subject: str | None, look: str, model: str = "toyworld", seeds=range(3)) -> dict:
    """'a star on sky' with the left-to-right box track on the phrase "star", the trained subject on it (None: the
    untuned model), per render seed: `distance` (sliced_distance of the subject's pixels in its box to the photos'
    subject colours), `balance` of the look's two colours (colour_balance) and `hit_rate` / `iou` of the look's
    colours in the box. Means over seeds, and the per-seed rows."""
    from studio.controls.boxes import interpolate

    photos, masks = subject_photos(LOOKS.get(look, look), LIKENESS_SHAPE)
    ref = photo_colours(photos, masks)
    target = np.mean([colour_histogram(p[None]) for p in photos], 0)
    colours = tuple(c for c, v in zip(world.COLORS, target) if v > 0.1)
    boxes = interpolate(LEFT_TO_RIGHT, world.FRAMES)
    rows = []
    for s in seeds:
        subj = {"phrase": LIKENESS_SHAPE, "boxes": LEFT_TO_RIGHT, **({"subject": subject} if subject else {})}
        frames = _render(manager, model, prompt=f"a {LIKENESS_SHAPE} on sky", seed=s, subjects=[subj])
        rows.append({"distance": sliced_distance(subject_pixels(frames, boxes), ref),
                     "balance": colour_balance(frames, colours) if len(colours) == 2 else float("nan"),
                     **box_adherence(frames, colours, boxes)})
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["per_seed"] = rows
    return out


def vae_likeness(pipe, look: str) -> float:
    """The VAE's ceiling for a look: sliced_distance of its reconstruction of the photos (their subject pixels) to
    the photos' own colours; a tuned subject cannot come closer than this."""
    import torch

    photos, masks = subject_photos(LOOKS.get(look, look), LIKENESS_SHAPE)
    x = torch.from_numpy(np.stack(photos)).float().div(127.5).sub(1).permute(0, 3, 1, 2)  # (n, 3, S, S)
    with torch.no_grad():
        vae = pipe.vae
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        y = vae.decode(z).sample.float().clamp(-1, 1)
    rec = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (n, S, S, 3)
    return sliced_distance(photo_colours(list(rec), masks), photo_colours(photos, masks))
