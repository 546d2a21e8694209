"""Measure a toy-world model's gates on held-out seeds: does a rendered clip show what its caption says?

The same checks on both toy models, models/toyworld (AnimateDiff layout, 8 frames) and models/toyworld-wan (Wan
layout, 9 frames); only how the model is called for the binding measure, the frame count and the gates (GATES per
family) differ.

Checks (each a pure function of uint8 frames, scoring ~100% on ground-truth clips of the world):
- background: the median colour of the frames, nearest background prototype (subjects cover < 20% of a frame);
- colour: the subject colour with the most pixels near its RGB value (and away from the background's);
- direction: the displacement of that colour's centroid from the first to the last frames, its dominant axis;
- binding: the subject phrase's cross-attention mass inside the true mask, over the mask's area fraction
  (1 = no binding; the trained STCA loss should push it well above); on Wan measured on every block's attn2, per
  latent frame against the mean mask of the frames it encodes;
- render time: the model's default shot (its frames, at native size, with guidance), through the ordinary engine
  path.

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
# The toy Wan's gates (issue 19): direction is reported, not gated; a render may take 5 s on 2 CPU cores.
GATES_BY_FAMILY = {"animatediff": GATES,
                   "wan": {"colour": 0.80, "background": 0.90, "binding_ratio": 2.0, "render_s": 5.0}}
PRESET_BY_FAMILY = {"animatediff": "toyworld", "wan": "toyworld-wan"}  # where fps, steps and guidance come from
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


def thirds_travel(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(2,) px the colour's centroid travels from the first third of the clip to the last (each third's mean
    centroid; NaN when a third has no subject)."""
    import warnings

    track = subject_track(frames, colour)
    n = max(1, len(frames) // 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a third without the subject: NaN
        return np.nanmean(track[-n:], 0) - np.nanmean(track[:n], 0)


def classify_direction(frames: np.ndarray, colour: str, min_travel: float = 2.0) -> str | None:
    """left/right/up/down from the centroid's travel between the first and last thirds of the clip."""
    travel = thirds_travel(frames, colour)
    if np.isnan(travel).any():
        return None
    dx, dy = travel
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


def ground_truth_clip(p: dict, frames: int = world.FRAMES) -> world.Clip:
    """The world's own clip for an eval prompt (what a perfect model would render)."""
    rng = np.random.default_rng([p["seed"], 5])
    radius = float(rng.uniform(4.5, 7.0))
    path = world.make_path(p["motion"], radius, rng, frames)
    subject = world.SubjectSpec(p["colour"], p["shape"], radius, path, p["motion"])
    return world.render_clip(p["background"], [subject], seed=p["seed"], frames=frames)


def score_clip(frames: np.ndarray, p: dict) -> dict:
    colour = classify_colour(frames)
    direction = classify_direction(frames, colour) if colour else None
    return {"background": classify_background(frames) == p["background"], "colour": colour == p["colour"],
            "direction": direction == p["motion"], "seen": {"colour": colour, "direction": direction,
                                                          "background": classify_background(frames)}}


def score_prompts(manager, model: str, prompts: list[dict]) -> list[dict]:
    """score_clip of each prompt rendered on a model preset with the shot defaults (its caption and seed)."""
    from studio import engine, shot as shotlib

    return [score_clip(engine.render(shotlib.from_container({"model": model, "prompt": p["caption"],
                                                              "seed": p["seed"]}), manager).frames, p)
            for p in prompts]


def score_ground_truth(n: int = 48, seed: int = 0, frames: int = world.FRAMES) -> dict:
    """The checks on the world's own clips: how far the eval can be trusted (should be ~1.0)."""
    rows = [score_clip(ground_truth_clip(p, frames).frames, p) for p in eval_prompts(n, seed)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "background", "direction")}


def attention_binding(pipe, prompts: list[dict], t_frac: float = 0.5) -> float:
    """Mean over prompts of (phrase attention mass inside the true mask) / (mask area fraction).

    The ground-truth clip is encoded, noised to half way (timestep t_frac·T on the UNet's schedule, σ = t_frac on
    Wan's flow) and passed through the denoiser with its caption; every text cross-attention layer's map for the
    phrase tokens (heads averaged, tokens summed, renormalised over pixels) is resized to S×S and compared with the
    mask (on Wan per latent frame, with the mean mask of the frames that latent frame encodes).
    """
    from studio import families

    if families.of(pipe).name == "wan":
        return _wan_binding(pipe, prompts, t_frac)
    return _unet_binding(pipe, prompts, t_frac)


def binding_ratio(maps: list, mask) -> float:
    """Attention mass inside the mask over the mask's area: maps, per layer (G, side, side) attention to the phrase
    (G frames or latent frames); mask (G, S, S) in 0..1. Each map is resized to S×S and renormalised per frame, the
    layers averaged; the ratio is averaged over the G frames (1 = attention spread evenly)."""
    import torch
    import torch.nn.functional as F

    norm = []
    for m in maps:
        m = F.interpolate(m.float()[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        norm.append(m / m.sum((-2, -1), keepdim=True).clamp_min(1e-12))
    attn = torch.stack(norm).mean(0)  # (G, S, S), sums to 1 per frame
    inside = (attn * mask).sum((-2, -1))  # (G,)
    area = mask.mean((-2, -1)).clamp_min(1e-6)
    return float((inside / area).mean())


def _unet_binding(pipe, prompts: list[dict], t_frac: float) -> float:
    import torch

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
                maps.append(probs[..., pos].sum(-1).view(-1, side, side))  # (F, side, side)
            ratios.append(binding_ratio(maps, mask))
    finally:
        unet.set_attn_processor(orig)
        store.clear()
    return float(np.mean(ratios))


def _wan_binding(pipe, prompts: list[dict], t_frac: float) -> float:
    import torch

    from studio import families
    from studio.controls.noise_warp import grouped_map
    from studio.toyworld import wan
    from studio.toyworld.train import to_pixels

    tr, vae, tok, te = pipe.transformer, pipe.vae, pipe.tokenizer, pipe.text_encoder
    length = families.get("wan").text_length(pipe)
    temporal = vae.config.scale_factor_temporal
    frames = wan.FRAMES
    store: list = []
    orig = wan.capture_cross_attention(tr, store)
    ratios = []
    try:
        for p in prompts:
            clip = ground_truth_clip(p, frames)
            gen = torch.Generator().manual_seed(p["seed"])
            ids, att, (pos,) = wan.phrase_positions(tok, p["caption"], [f"{p['colour']} {p['shape']}"], length)
            with torch.no_grad():
                x = to_pixels(clip.frames).transpose(0, 1)[None].to(vae.dtype)  # (1, 3, F, S, S)
                z0 = wan.normalize_latents(vae, vae.encode(x).latent_dist.mean.float())  # (1, C, F', h, w)
                zt = (1 - t_frac) * z0 + t_frac * torch.randn(z0.shape, generator=gen)
                text = wan.encode_text(te, torch.tensor([ids]), torch.tensor([att])).to(tr.dtype)  # (1, L, D)
                store.clear()
                tr(zt.to(tr.dtype), torch.tensor([t_frac * pipe.scheduler.config.num_train_timesteps]),
                   encoder_hidden_states=text)
            masks = torch.from_numpy(clip.masks[0].astype(np.float32))  # (F, S, S)
            groups = grouped_map(frames, temporal)
            mask = torch.stack([masks[g].mean(0) for g in groups])  # (F', S, S)
            maps = []
            for probs in store:  # (1, N, L)
                side = wan.side_of(probs.shape[1], len(groups))
                maps.append(probs[0, :, pos].sum(-1).view(len(groups), side, side))  # (F', side, side)
            ratios.append(binding_ratio(maps, mask))
    finally:
        tr.set_attn_processor(orig)
        store.clear()
    return float(np.mean(ratios))


def model_family(model_dir: Path) -> str:
    """'animatediff' or 'wan': the family of a toy-world model folder, by its pipeline class."""
    from studio.toyworld.train import model_family as family_of

    family = family_of(model_dir)
    if family is None:
        raise ValueError(f"--model: {str(model_dir)!r} is not a toy-world model folder (an AnimateDiff or Wan "
                         f"diffusers folder)")
    return family


def _preset_file(model_dir: Path, folder: Path) -> Path:
    """A model preset for a model folder, so the eval renders through the ordinary engine path.

    AnimateDiff: the size and size multiple come from the folder's VAE and UNet configs; fps, steps and guidance from
    the toyworld preset. Wan: the frame rule and size multiple from the folder's VAE and transformer configs (frames
    T·k + 1; sizes a multiple of the VAE factor times the patch and of 16, which WanPipeline requires); frames, size,
    fps, steps and guidance from the toyworld-wan preset.
    """
    import json

    from omegaconf import OmegaConf

    from studio.presets import load_model_preset

    family = model_family(model_dir)
    d = load_model_preset(PRESET_BY_FAMILY[family]).defaults
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    if family == "wan":
        tr = json.loads((model_dir / "transformer" / "config.json").read_text())
        grid = int(vae["scale_factor_spatial"]) * int(tr["patch_size"][1])
        multiple = grid * 16 // math.gcd(grid, 16)
        preset = {"name": "eval", "family": "wan", "base": str(model_dir.resolve()),
                  "defaults": {"frames": d.frames, "width": d.width, "height": d.height, "fps": d.fps,
                               "steps": d.steps, "guidance_scale": d.guidance_scale},
                  "size_multiple": multiple, "max_size": 4 * d.width, "min_frames": 1,
                  "max_frames": 4 * d.frames, "frame_step": int(vae["scale_factor_temporal"]), "frame_offset": 1}
    else:
        unet = json.loads((model_dir / "unet" / "config.json").read_text())
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)  # as diffusers' vae_scale_factor
        size = int(unet["sample_size"]) * vae_factor  # the UNet's latent size, in pixels
        multiple = vae_factor * 2 ** (len(unet["block_out_channels"]) - 1)  # the UNet halves the latent per down block
        preset = {"name": "eval", "family": "animatediff", "base": str(model_dir.resolve()),
                  "defaults": {"frames": world.FRAMES, "width": size, "height": size, "fps": d.fps, "steps": d.steps,
                               "guidance_scale": d.guidance_scale},
                  "size_multiple": multiple, "max_size": 4 * size,
                  "max_frames": int(unet.get("motion_max_seq_length", 32))}
    path = folder / "eval-model.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(preset)))
    return path


def evaluate(model_dir: str | Path = "models/toyworld", n: int = 48, seed: int = 0, binding_n: int = 16,
             steps: int | None = None, guidance_scale: float | None = None, threads: int = 2) -> dict:
    """Render n held-out prompts through the engine and score them; measure binding and render time.

    Steps and guidance default to the family's toy preset (toyworld: 20 and 7.5). The render-time gate is for
    `threads` CPU threads (torch.set_num_threads; 0 leaves torch's default); the previous thread count is restored
    afterwards.
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


def _evaluate(model_dir: Path, n: int, seed: int, binding_n: int, steps: int | None,
              guidance_scale: float | None) -> dict:
    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager
    from studio.presets import load_model_preset

    manager = PipelineManager(max_pipelines=1, device="cpu")
    prompts = eval_prompts(n, seed)
    rows, times = [], []
    family = model_family(model_dir)
    gates = GATES_BY_FAMILY[family]
    with tempfile.TemporaryDirectory() as tmp:
        preset = _preset_file(model_dir, Path(tmp))
        d = load_model_preset(str(preset)).defaults
        steps = d.steps if steps is None else steps
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
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
        "model": str(model_dir), "family": family, "n": n, "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "frames": d.frames, "size": d.width,
        "colour": float(np.mean([r["colour"] for r in rows])),
        "background": float(np.mean([r["background"] for r in rows])),
        "direction": float(np.mean([r["direction"] for r in rows])),
        "binding_ratio": binding,
        "render_s": float(np.median(times)) if times else float("nan"),
        "ground_truth": score_ground_truth(n, seed, d.frames),
        "chance": CHANCE, "gates": gates,
        "rows": rows,
    }
    result["passed"] = {k: (result[k] < g if k == "render_s" else result[k] >= g) for k, g in gates.items()}
    return result


def format_report(result: dict) -> str:
    gates = result.get("gates", GATES)
    frames = result.get("frames", world.FRAMES)

    def verdict(k):
        return ("yes" if result["passed"][k] else "NO") if k in gates else "not gated"

    lines = [f"toy-world eval of {result['model']}: {result['n']} held-out prompts, {result['steps']} steps, "
             f"guidance {result['guidance_scale']}", "",
             "| check | measured | gate | chance | ground truth | pass |", "|---|---|---|---|---|---|"]
    for k in ("colour", "background", "direction"):
        gate = f"≥ {gates[k]:.2f}" if k in gates else "–"
        lines.append(f"| {k} right | {result[k]:.2f} | {gate} | {CHANCE[k]:.2f} | "
                     f"{result['ground_truth'][k]:.2f} | {verdict(k)} |")
    lines.append(f"| phrase attention in mask / area | {result['binding_ratio']:.2f} | ≥ {gates['binding_ratio']:.1f}"
                 f" | 1.00 | – | {verdict('binding_ratio')} |")
    lines.append(f"| render {frames} frames, native size (s) | {result['render_s']:.2f} | < {gates['render_s']:.1f} | – "
                 f"| – | {verdict('render_s')} |")
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


def model_frames(model: str) -> int:
    """The frame count a model preset renders by default (8 on the UNet toy, 9 = 4k + 1 on the toy Wan)."""
    from studio.presets import load_model_preset

    return int(load_model_preset(model).defaults.frames)


def track_for(keyframes: dict, frames: int) -> dict:
    """A track drawn for the UNet toy's 8 frames (keyframes 0..7) stretched over `frames` frames (its last keyframe
    on the last frame), as a user redrawing it on the longer clip would."""
    last = max(keyframes)
    return {round(k * (frames - 1) / last): v for k, v in keyframes.items()}


def measure_box_control(manager, model: str = "toyworld", seeds=range(8)) -> dict:
    """A yellow star on sky with a left-to-right track, with and without box control: hit rate and IoU."""
    from studio.controls.boxes import interpolate

    frames = model_frames(model)
    track = track_for(LEFT_TO_RIGHT, frames)
    boxes = interpolate(track, frames)
    out = {}
    for on in (True, False):
        subjects = [{"phrase": "yellow star", "boxes": track}] if on else []
        rows = [box_adherence(_render(manager, model, prompt="a yellow star on sky", seed=s, subjects=subjects),
                              "yellow", boxes) for s in seeds]
        out["with" if on else "without"] = {k: float(np.mean([r[k] for r in rows])) for k in ("hit_rate", "iou")}
    return out


def measure_two_subjects(manager, model: str = "toyworld", seeds=range(6)) -> dict:
    """A red square and a yellow star crossing on opposite tracks: each one's hit rate in its own box."""
    from studio.controls.boxes import interpolate

    n = model_frames(model)
    tracks = {p: track_for(b, n) for p, b in TWO_TRACKS.items()}
    hits: dict[str, list] = {p: [] for p in TWO_TRACKS}
    for s in seeds:
        frames = _render(manager, model, prompt="a red square and a yellow star on sky", seed=s,
                         subjects=[{"phrase": p, "boxes": b} for p, b in tracks.items()])
        for p, b in tracks.items():
            hits[p].append(box_adherence(frames, p.split()[0], interpolate(b, n))["hit_rate"])
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


def subject_travel(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(2,) the colour's centroid motion in px/frame: thirds_travel over the frames between the thirds' centres
    (NaN when the subject is not found)."""
    return thirds_travel(frames, colour) / (len(frames) - max(1, len(frames) // 3))


def measure_camera_subject(manager, cx: float, cy: float, model: str = "toyworld-wan", seeds=range(4),
                           prompt: str = "a red square on grass") -> dict:
    """A pan measured by a still subject of the world instead of the background's texture (the toy Wan draws its
    backgrounds without the fine texture the sidecar's content_motion follows): per seed, the subject's travel in
    the panned render minus its travel in the same shot unpanned (the model's own drift), against the content
    motion the pan asks for (measures.requested_motion). Returns the mean relative motion (dx, dy) px/frame, each
    render's ratio along the requested direction, and the share of renders whose subject moved the requested way."""
    from studio import engine, measures, metrics, shot as shotlib

    colour = metrics.subject_colour(prompt)
    rows = []
    for s in seeds:
        got = {}
        for key, cam in (("pan", {"cx": cx, "cy": cy}), ("still", {})):
            r = engine.render(shotlib.from_container({"model": model, "prompt": prompt, "seed": s, "camera": cam}),
                              manager)
            got[key] = subject_travel(r.frames, colour)
        F, H, W = r.frames.shape[:3]
        want = measures.requested_motion(cx, cy, F, H, W)
        rel = got["pan"] - got["still"]
        ratio = float(rel @ want / (want @ want)) if np.isfinite(rel).all() else float("nan")
        rows.append({"motion": rel, "ratio": ratio})
    ok = [r["ratio"] for r in rows if np.isfinite(r["ratio"])]
    return {"motion": [float(v) for v in np.nanmean([r["motion"] for r in rows], 0)],
            "ratios": [round(r["ratio"], 3) for r in rows], "right_way": float(np.mean([v > 0 for v in ok])) if ok
            else 0.0, "found": len(ok)}


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
        pans = ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5))
        wan = model_family(Path(model_dir)) == "wan"
        # the toy Wan's backgrounds carry no texture to follow: its pans are measured by a still subject; its
        # reference at strength 3 (at 1 the key/value tokens barely move its colours)
        camera = measure_camera_subject if wan else measure_camera
        return {"box": measure_box_control(manager, model), "two_subjects": measure_two_subjects(manager, model),
                "camera": {f"{cx},{cy}": camera(manager, cx, cy, model) for cx, cy in pans},
                "reference": measure_reference(manager, ref, strength=3.0 if wan else 10.0, model=model)}


def model_card(result: dict, model_dir: str | Path, hardware: str, train_seconds: float | None = None) -> str:
    """The model folder's README: data, architecture, training run and the measured gates (from `result`)."""
    import json

    from studio.toyworld.train import reproduce_command

    model_dir = Path(model_dir)
    if model_family(model_dir) == "wan":
        return _wan_card(result, model_dir, hardware, train_seconds)
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


def _gate_verdict(result: dict) -> str:
    failed = [k for k, ok in result["passed"].items() if not ok]
    return ("All gates pass." if not failed else
            f"Gates not reached by this run: {', '.join(failed)}. The eval keeps them, so a longer training "
            f"run (`studio toyworld train --init` continues it) can pass them.")


def _wan_card(result: dict, model_dir: Path, hardware: str, train_seconds: float | None) -> str:
    """The toy Wan's README (see model_card)."""
    import json

    from studio.toyworld.train import reproduce_command

    info = json.loads((model_dir / "training.json").read_text())
    cfg = info["config"]
    tr = json.loads((model_dir / "transformer" / "config.json").read_text())
    te = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    sched = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    tok = json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text())
    sizes = {p.parent.name: p.stat().st_size for p in model_dir.rglob("*.safetensors")}
    params = tr["num_attention_heads"] * tr["attention_head_dim"]
    fs, ft = vae["scale_factor_spatial"], vae["scale_factor_temporal"]
    frames, size = result.get("frames", 9), result.get("size", world.SIZE)
    latent_frames = (frames - 1) // ft + 1
    side = size // fs // tr["patch_size"][1]
    hours = f"{train_seconds / 3600:.1f} h" if train_seconds else "see training.json"
    clips = max(1, cfg["vae_batch"] // frames)
    lines = [
        "# toyworld-wan: the Shot Studio toy Wan", "",
        "A tiny text-to-video model in the Wan 2.1 layout (diffusers format: AutoencoderKLWan, WanTransformer3DModel, "
        "a UMT5 encoder, flow matching with UniPC), trained by this project on its synthetic toy world so the Wan "
        "path of the studio and its controls can be tested on a CPU with no download. Load it like any Wan folder: "
        "`WanPipeline.from_pretrained(\"models/toyworld-wan\")`, or use the `toyworld-wan` preset.", "",
        "## Data", "",
        f"Clips generated on the fly by `studio/toyworld/world.py` (deterministic by seed), the same world as the "
        f"UNet toy (models/toyworld) at {frames} frames (4k + 1, as Wan's causal VAE takes) of {size}×{size} pixels: "
        "backgrounds grass, sand, sky; one subject (75%) or two (25%): circle, square, triangle or star in red, "
        "yellow, white or purple; motion left/right/up/down named in the caption, or still / a free path with no "
        "motion word (25%), or a camera pan (15%); per-frame masks. Personal looks and trigger words never appear in "
        "training captions (the VAE sees the personal looks). Held-out evaluation seeds start at 10⁹; training "
        "seeds stay below.", "",
        "## Architecture", "",
        f"- VAE: AutoencoderKLWan (causal 3D), base {vae['base_dim']} channels, dim_mult {vae['dim_mult']}, "
        f"{vae['num_res_blocks']} residual block a level, z_dim {vae['z_dim']}: ×{fs} in space and ×{ft} in time "
        f"(scale_factor_spatial {fs}, scale_factor_temporal {ft}), so {frames} frames of {size}×{size} → "
        f"{latent_frames} latent frames of {size // fs}×{size // fs} (latent 0 = frame 0, latent k ≥ 1 = frames "
        f"{ft}k−{ft - 1}..{ft}k). latents_mean / latents_std calibrated per channel on world clips after "
        f"{info['vae_steps']} VAE steps ({clips} clips a step, loss weighted ×{1 + cfg['vae_subject_weight']:.0f} on "
        "subject pixels).",
        f"- Transformer: WanTransformer3DModel, {tr['num_layers']} blocks, {tr['num_attention_heads']} heads × "
        f"{tr['attention_head_dim']} (width {params}), ffn {tr['ffn_dim']}, patch {tuple(tr['patch_size'])}: "
        f"{side}×{side} tokens per latent frame, {latent_frames * side * side} a clip; 3D RoPE self-attention "
        "(attn1), text cross-attention (attn2) with RMS q/k norms as Wan.",
        f"- Text: UMT5EncoderModel, width {te['d_model']} × {te['num_layers']} layers; a T5-kind unigram tokenizer "
        "built by the project (studio/families/wan_build.py) in which every world word is one piece; prompts "
        f"zero-padded to {tok.get('model_max_length')} tokens (Wan pads to 512; the studio calls the pipeline with "
        "max_sequence_length = the tokenizer's length).",
        f"- Scheduler: UniPCMultistepScheduler, flow prediction, flow_shift {sched.get('flow_shift')}.",
        f"- Weights: fp16 safetensors, {sum(sizes.values()) / 2**20:.1f} MB "
        f"({', '.join(f'{k} {v / 2**20:.1f} MB' for k, v in sorted(sizes.items()))}).", "",
        "## Training", "",
        f"- {info['t2v_steps']} text-to-video steps at batch {cfg['batch']} clips, AdamW lr {cfg['lr']} (warm-up "
        f"{cfg['warmup']}), caption dropout {cfg['p_uncond']} for guidance, EMA {cfg['ema_decay']}; transformer and "
        f"text encoder trained together, VAE frozen; seed {cfg['seed']}.",
        f"- Loss: flow matching (x_σ = (1 − σ)·z0 + σ·ε, σ uniform, velocity ε − z0 predicted at timestep 1000·σ) + "
        f"{cfg['stca_weight']} × STCA on every block's attn2 (MotionBooth's subject-token cross-attention loss: BCE "
        "between each subject phrase's attention map, q = norm_q(to_q(x)), k = norm_k(to_k(text)), and its mask per "
        "latent frame), which binds the subject words to where the subject is, so box control by attn2 logit "
        "editing can work on this model.",
        f"- Hardware: {hardware}; wall clock {hours}.",
        f"- Reproduce: `mkdir -p runs && {reproduce_command(info)} > runs/train-wan.log 2>&1` (the recorded settings, "
        "with the step count reached as --steps so that the steps and not the clock end the run; resumable; "
        "floating-point results depend on the torch build and thread count), then `studio toyworld eval --model "
        "runs/toyworld-wan/model`. Continue training this model instead: `studio toyworld train --family wan --init "
        "models/toyworld-wan --work runs/toyworld-wan-more --budget SECONDS`.", "",
        "## Measured gates", "",
        format_report(result), "",
        _gate_verdict(result), "",
        "Checks: colour = the subject colour with most pixels; background = nearest background to the median "
        "colour; direction = the subject colour's centroid travel between the first and last thirds of the clip "
        "(reported, not gated, on this model); binding = attention mass of the phrase inside the true mask over the "
        "mask's area, on attn2 of every block, per latent frame (1 = unbound). The \"ground truth\" column is the "
        "same checks on the world's own clips.", "",
        "## Limits", "",
        f"Only this world's words mean anything to it. {size}×{size} pixels, {frames} frames. Not for anything but "
        "demos, tests and CPU-only use of the studio's Wan path.",
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
