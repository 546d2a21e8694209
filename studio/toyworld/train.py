"""Training of the embedded toy-world models: a VAE stage, then the text-to-video stage.

Two families: `animatediff` (models/toyworld, the recipe below) and `wan` (models/toyworld-wan: the recipe is
studio.toyworld.wan.WanRecipe: a causal Wan VAE, a WanTransformer3DModel trained by flow matching, STCA on attn2).
The stages, checkpoints, resumption, EMA and export are shared; a recipe says what differs.

Stage 1 trains the AutoencoderKL on world frames with a reconstruction loss weighted toward subject pixels
(small subjects otherwise wash out in the latents). Stage 2 trains the UNetMotionModel and the CLIP text
encoder from scratch on captioned clips with the ε-prediction diffusion loss plus an auxiliary
subject-token cross-attention loss (MotionBooth's STCA, ../shared/design/METHODS.md §1.1): each subject
phrase's mean cross-attention map is pulled onto that subject's mask, which binds words to places and is
what lets box control by cross-attention editing work on this model.

Reproducible by seed (every batch and every noise draw derives from (seed, step)), resumable from the
checkpoint in the work folder, bounded by a time budget, and logged (steps/s, loss) to be run in the
background. Shapes: B clips, F frames, C=4 latent channels, h×w latent size, N=h·w tokens, L=77 text tokens.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

import numpy as np

from studio.toyworld import world
from studio.toyworld.model import ToyArch, build_components

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it, so that TrainConfig (and the `studio` command's flags built
# from it) load without torch.

logger = logging.getLogger(__name__)

def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are those of the shipped run (models/toyworld/training.json).

    `studio toyworld train` has one flag per field (--budget for budget_s), so a run's training.json is a command.
    """

    work: Optional[str] = _opt(None, "checkpoint folder (a run resumes from it); default runs/toyworld, "
                                     "runs/toyworld-wan for --family wan")
    out: Optional[str] = _opt(None, "where the diffusers folder is exported, default <work>/model (models/toyworld and "
                                    "models/toyworld-wan are the shipped models: name them only to replace those)")
    family: str = _opt("animatediff", "model family: animatediff (models/toyworld) or wan (models/toyworld-wan)")
    init: Optional[str] = _opt(None, "an exported model folder (e.g. models/toyworld) to continue: the text-to-video "
                                     "stage starts from its weights and step count, with a fresh optimizer")
    seed: int = _opt(0, "seed of every batch and noise draw")
    vae_steps: int = _opt(1000, "VAE steps (stage 1)")
    vae_batch: int = _opt(32, "VAE batch, in frames (wan: whole clips of 9 frames, rounded down)")
    vae_lr: float = _opt(1e-3, "VAE learning rate")
    vae_subject_weight: float = _opt(10.0, "extra VAE loss weight on subject pixels")
    steps: int = _opt(20000, "total text-to-video steps (the time budget usually ends training first)")
    batch: int = _opt(8, "text-to-video batch, in clips")
    lr: float = _opt(6e-4, "text-to-video learning rate (AdamW, after the warm-up)")
    warmup: int = _opt(200, "linear learning-rate warm-up, in steps of a fresh optimizer")
    p_uncond: float = _opt(0.1, "caption dropout, for classifier-free guidance")
    stca_weight: float = _opt(0.1, "weight of the subject-token cross-attention loss")
    ema_decay: float = _opt(0.999, "EMA decay of the exported weights")
    budget_s: float = _opt(8400.0, "wall-clock seconds for this run (both stages)")
    log_every: int = _opt(25, "log every this many steps")
    ckpt_every: int = _opt(250, "checkpoint every this many steps")
    export_every: int = _opt(500, "also export the model folder every this many text-to-video steps (0: at the end)")
    threads: int = _opt(2, "torch threads (0: torch's default); results are bit-identical only at the same count")


# Settings that determine the trained weights (the others only log, checkpoint, export or bound the run).
# (`family` too, given on the command line when it is not animatediff.)
RESULT_FIELDS = ("seed", "vae_steps", "vae_batch", "vae_lr", "vae_subject_weight", "steps", "batch", "lr", "warmup",
                 "p_uncond", "stca_weight", "ema_decay", "threads")


def reproduce_command(info: dict, work: str | None = None, out: str | None = None, budget_s: float = 86400.0) -> str:
    """The `studio toyworld train` command that reruns an exported model's training (its training.json `info`):
    every setting that determines the weights, with the step count it reached as --steps and a budget long
    enough that the step count, not the clock, ends the run."""
    cfg = {**info["config"], "steps": info["t2v_steps"]}
    family = cfg.get("family", "animatediff")
    work = work or default_work(family)
    args = [f"--work {work}", f"--out {out or str(Path(work) / 'model')}"]
    if family != "animatediff":
        args.append(f"--family {family}")
    if cfg.get("init"):
        args.append(f"--init {cfg['init']}")
    args += [f"--{name.replace('_', '-')} {cfg[name]:g}" if isinstance(cfg[name], float) else
             f"--{name.replace('_', '-')} {cfg[name]}" for name in RESULT_FIELDS]
    return " ".join(["studio toyworld train", *args, f"--budget {budget_s:g}"])


# --- data ------------------------------------------------------------------------------------------------


def clip_seed(seed: int, step: int, i: int, batch: int) -> int:
    """The world seed of item i of a training batch; always below EVAL_SEED_OFFSET."""
    return (seed * 7_919 + step * batch + i) % world.EVAL_SEED_OFFSET


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float in -1..1."""
    import torch

    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def phrase_token_positions(input_ids: list[int], phrase_ids: list[int], start: int = 0) -> list[int]:
    """Positions of the first occurrence of phrase_ids in input_ids at or after start ([] if absent)."""
    n = len(phrase_ids)
    for i in range(start, len(input_ids) - n + 1):
        if input_ids[i:i + n] == phrase_ids:
            return list(range(i, i + n))
    return []


# --- the STCA loss of world training --------------------------------------------------------------------


def stca_loss(store: list, masks: torch.Tensor, token_pos: list[list[list[int]]], frames: int) -> torch.Tensor:
    """BCE between each subject phrase's mean attention map and its soft mask, averaged over layers.

    masks: (B, K, F, S, S) float; token_pos[b][k]: token positions of clip b's subject k ([] = skip).
    """
    import torch
    import torch.nn.functional as F

    terms = []
    for probs in store:  # (B·F, N, L)
        n = probs.shape[1]
        side = int(math.isqrt(n))
        soft = F.interpolate(masks.flatten(0, 2)[:, None], size=(side, side), mode="area")
        soft = soft.view(*masks.shape[:3], n)  # (B, K, F, N)
        for b, subjects in enumerate(token_pos):
            for k, pos in enumerate(subjects):
                if not pos:
                    continue
                a = probs[b * frames:(b + 1) * frames, :, pos].mean(-1)  # (F, N)
                terms.append(F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), soft[b, k]))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


# --- stages ----------------------------------------------------------------------------------------------


def _subject_weight(masks: np.ndarray, extra: float) -> torch.Tensor:
    """(n, 1, S, S) loss weights: 1 everywhere plus `extra` on (slightly dilated) subject pixels."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return 1.0 + extra * m


def vae_batch(cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vae_batch, 3, S, S) pixels and their loss weights; includes personal subjects (see world.sample_clip)."""
    per_clip = 4
    clips = [world.sample_clip(clip_seed(cfg.seed + 1, step, i, cfg.vae_batch), personal=True)
             for i in range(cfg.vae_batch // per_clip)]
    rng = np.random.default_rng([cfg.seed, step, 7])
    frames, masks = [], []
    for c in clips:
        idx = rng.choice(world.FRAMES, per_clip, replace=False)
        frames.append(c.frames[idx])
        masks.append(c.masks[:, idx].any(0))
    return to_pixels(np.concatenate(frames)), _subject_weight(np.concatenate(masks), cfg.vae_subject_weight)


def train_vae(vae, cfg: TrainConfig, state: dict, deadline: float, checkpoint=None, batch=None) -> None:
    """Stage 1: reconstruction weighted toward subject pixels, on `batch(cfg, step)` -> (pixels, weights): frames
    (n, 3, S, S) on the UNet family, clips (n, 3, F, S, S) on Wan (its VAE is a video VAE)."""
    import torch

    batch = batch or vae_batch
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    vae.train()
    t0, start = time.time(), state.get("vae_step", 0)
    for step in range(start, cfg.vae_steps):
        x, w = batch(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (w * (rec - x) ** 2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["vae_step"] = step + 1
        if (step + 1) % cfg.log_every == 0:
            rate = (step + 1 - start) / (time.time() - t0)
            logger.info("vae step %d/%d loss %.5f %.2f steps/s", step + 1, cfg.vae_steps, loss.item(), rate)
        if checkpoint is not None and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.vae_steps:
            state["vae_opt"] = opt.state_dict()
            checkpoint()
        if time.time() > deadline:
            break
    state["vae_opt"] = opt.state_dict()
    vae.eval()


def calibrate_vae_scale(vae, cfg: TrainConfig, n_clips: int = 64) -> float:
    """1/std of the latents (as SD's 0.18215), so scaled latents have unit variance."""
    import torch

    x = torch.cat([to_pixels(world.sample_clip(world.EVAL_SEED_OFFSET // 2 + i).frames) for i in range(n_clips)])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return float(1.0 / z.std())


def t2v_batch(cfg: TrainConfig, tokenizer, step: int):
    """Pixels (B, F, 3, S, S), masks (B, K, F, S, S), token ids (B, L), STCA token positions, per clip."""
    import torch

    clips = [world.sample_clip(clip_seed(cfg.seed, step, i, cfg.batch)) for i in range(cfg.batch)]
    rng = np.random.default_rng([cfg.seed, step, 11])
    captions = ["" if rng.random() < cfg.p_uncond else c.caption for c in clips]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    k_max = max(len(c.subjects) for c in clips)
    masks = np.zeros((cfg.batch, k_max, world.FRAMES, world.SIZE, world.SIZE), np.float32)
    token_pos = []
    for b, c in enumerate(clips):
        masks[b, :len(c.subjects)] = c.masks
        row, pos, start = ids[b].tolist(), [], 0
        for phrase in (c.phrases if captions[b] else []):
            p = phrase_token_positions(row, tokenizer(phrase, add_special_tokens=False).input_ids, start)
            pos.append(p)
            start = p[-1] + 1 if p else start
        token_pos.append(pos)
    pixels = torch.stack([to_pixels(c.frames) for c in clips])
    return pixels, torch.from_numpy(masks), ids, token_pos


class UNetRecipe:
    """The animatediff side: AutoencoderKL on frames, UNetMotionModel + CLIP trained with the ε-prediction loss (DDIM's
    schedule) plus STCA on the spatial cross-attention layers."""

    family = "animatediff"
    pipeline_class = "AnimateDiffPipeline"
    denoiser_key = "unet"
    components = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")

    def build(self, seed: int) -> dict:
        return build_components(ToyArch(), seed=seed)

    def frames(self, c: dict) -> int:
        return world.FRAMES

    def vae_batch(self, cfg: TrainConfig, step: int):
        return vae_batch(cfg, step)

    def calibration(self, vae) -> dict:
        return {"scaling_factor": vae.config.scaling_factor}

    def calibrate(self, vae, cfg: TrainConfig) -> dict:
        vae.register_to_config(scaling_factor=calibrate_vae_scale(vae, cfg))
        return self.calibration(vae)

    def capture(self, denoiser, store: list) -> dict:
        from studio.controls.base import capture_cross_attention

        return capture_cross_attention(denoiser, store)

    def plain_processors(self, denoiser) -> None:
        denoiser.set_attn_processor(_plain_processors(denoiser))

    def losses(self, c: dict, cfg: TrainConfig, step: int, store: list):
        import torch
        import torch.nn.functional as F

        vae, unet, te, tok, sched = c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"]
        alphas = sched.alphas_cumprod
        pixels, masks, ids, token_pos = t2v_batch(cfg, tok, step)
        B, Fr = pixels.shape[:2]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with torch.no_grad():
            post = vae.encode(pixels.flatten(0, 1)).latent_dist
            z0 = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B·F, C, h, w)
            z0 = z0.unflatten(0, (B, Fr)).transpose(1, 2) * vae.config.scaling_factor  # (B, C, F, h, w)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen)
        a = alphas[t].view(B, 1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        text = te(ids)[0].repeat_interleave(Fr, 0)  # (B·F, L, D): UNetMotionModel expects per-frame text
        store.clear()
        eps = unet(zt, t, encoder_hidden_states=text).sample
        return F.mse_loss(eps, noise), stca_loss(store, masks, token_pos, Fr)


FAMILIES = ("animatediff", "wan")


def recipe_for(family: str):
    """The training recipe of a model family (ValueError naming --family when the toy world has none for it)."""
    if family == "animatediff":
        return UNetRecipe()
    if family == "wan":
        from studio.toyworld.wan import WanRecipe

        return WanRecipe()
    raise ValueError(f"--family: the toy world trains no model family {family!r} (valid: {', '.join(FAMILIES)})")


def default_work(family: str) -> str:
    return "runs/toyworld" if family == "animatediff" else f"runs/toyworld-{family}"


def resolved(cfg: TrainConfig) -> TrainConfig:
    """cfg with its default folders filled in for its family."""
    import dataclasses

    work = cfg.work or default_work(cfg.family)
    return dataclasses.replace(cfg, work=work, out=cfg.out or str(Path(work) / "model"))


class EMA:
    """Exponential moving average of parameters (with the usual warm-up of the decay)."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)  # detached on both sides: no autograd graph


def train_t2v(c: dict, cfg: TrainConfig, state: dict, deadline: float, recipe=None) -> None:
    import torch

    recipe = recipe or UNetRecipe()
    den, te = c[recipe.denoiser_key], c["text_encoder"]
    store: list = []
    orig = recipe.capture(den, store)
    params = [*den.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = EMA(params, cfg.ema_decay)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
    den.train()
    te.train()
    t0, start, logs = time.time(), state.get("step", 0), []
    opt_start = state.get("opt_start", 0)  # the step the optimizer started at (its warm-up counts from there)
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1 - opt_start) / max(1, cfg.warmup))
        l_mse, l_stca = recipe.losses(c, cfg, step, store)
        loss = l_mse + cfg.stca_weight * l_stca
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        state["step"] = step + 1
        logs.append((l_mse.item(), l_stca.item()))
        if (step + 1) % cfg.log_every == 0:
            rate = (step + 1 - start) / (time.time() - t0)
            m = np.mean(logs, 0)
            logs.clear()
            logger.info("t2v step %d loss %.4f stca %.4f %.2f steps/s, %.0f s left", step + 1, m[0], m[1], rate,
                        deadline - time.time())
        if (step + 1) % cfg.ckpt_every == 0:
            state.update(opt=opt.state_dict(), ema=[s.clone() for s in ema.shadow])
            save_checkpoint(c, cfg, state, recipe)
        if cfg.export_every and (step + 1) % cfg.export_every == 0:
            state.update(ema=[s.clone() for s in ema.shadow])
            store.clear()  # captured maps hold autograd graphs, which cannot be deep-copied
            export(c, cfg, state, recipe)
        if time.time() > deadline:
            break
    state.update(opt=opt.state_dict(), ema=[s.clone() for s in ema.shadow])
    store.clear()
    den.set_attn_processor(dict(orig))
    den.eval()
    te.eval()


# --- checkpoints and export ------------------------------------------------------------------------------


SHARD_BYTES = 15 * 2**20  # a checkpoint's tensors are packed into files of at most this many bytes (+ zip headers),
# so every file stays under 16 MiB: what a lent GPU machine can hand back per file


def _pack(obj, shards: list[dict], limit: int):
    """obj with every tensor replaced by {"__shard__": [i, name]}, the tensors appended to shards[i] (greedy, each
    shard below `limit` bytes; a bigger tensor gets a shard of its own)."""
    import torch

    if isinstance(obj, torch.Tensor):
        size = obj.numel() * obj.element_size()
        if obj.untyped_storage().nbytes() > size:  # a view: torch.save would write its whole storage
            obj = obj.clone()
        if not shards or (shards[-1] and shards[-1]["__bytes__"] + size > limit):
            shards.append({"__bytes__": 0})
        shard = shards[-1]
        name = str(len(shard) - 1)
        shard[name] = obj
        shard["__bytes__"] += size
        return {"__shard__": [len(shards) - 1, name]}
    if isinstance(obj, dict):
        return {k: _pack(v, shards, limit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v, shards, limit) for v in obj)
    return obj


def _unpack(obj, shards: list[dict]):
    if isinstance(obj, dict):
        if set(obj) == {"__shard__"}:
            i, name = obj["__shard__"]
            return shards[i][name]
        return {k: _unpack(v, shards) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, shards) for v in obj)
    return obj


def write_checkpoint(work: str | Path, blob: dict, limit: int = SHARD_BYTES) -> None:
    """Write a checkpoint as `checkpoint.pt` (the structure and counters) + `checkpoint-<tag>-<i>.pt` shards of at most
    `limit` tensor bytes each. Kill-safe: the shards get new names, the head is written to a temp file and renamed
    over the old one (the commit point), and only then are the old shards deleted; a run killed anywhere leaves one
    whole checkpoint, the old or the new."""
    import torch

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    head = _pack(blob, shards, limit)
    tag = f"{time.time_ns():x}"
    names = [f"checkpoint-{tag}-{i}.pt" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        shard.pop("__bytes__")
        torch.save(shard, work / name)
    tmp = work / "checkpoint.pt.tmp"
    torch.save({"__shards__": names, "head": head}, tmp)
    tmp.replace(work / "checkpoint.pt")
    for old in work.glob("checkpoint-*.pt"):
        if old.name not in names:
            old.unlink()


def read_checkpoint(work: str | Path) -> dict | None:
    """The checkpoint blob in `work` (sharded, or the single file of earlier runs), or None when there is none."""
    import torch

    path = Path(work) / "checkpoint.pt"
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "__shards__" not in blob:
        return blob  # a single-file checkpoint (runs before sharding)
    shards = [torch.load(Path(work) / name, map_location="cpu", weights_only=True) for name in blob["__shards__"]]
    return _unpack(blob["head"], shards)


def save_checkpoint(c: dict, cfg: TrainConfig, state: dict, recipe=None) -> None:
    """Write the resumable state atomically, in files of at most 16 MiB (write_checkpoint)."""
    recipe = recipe or UNetRecipe()
    key = recipe.denoiser_key
    blob = {"vae": c["vae"].state_dict(), key: c[key].state_dict(), "te": c["text_encoder"].state_dict(),
            "vae_calibration": recipe.calibration(c["vae"]), "config": asdict(cfg), **state}
    write_checkpoint(cfg.work, blob)
    logger.info("checkpoint at vae step %s, t2v step %s", state.get("vae_step", 0), state.get("step", 0))


def load_checkpoint(c: dict, cfg: TrainConfig, recipe=None) -> dict:
    recipe = recipe or UNetRecipe()
    blob = read_checkpoint(cfg.work)
    if blob is None:
        return {}
    family = blob.get("config", {}).get("family", "animatediff")
    if family != recipe.family:
        raise ValueError(f"--work: {cfg.work!r} holds the checkpoint of a {family} model, not of --family "
                         f"{recipe.family}; give another --work")
    c["vae"].load_state_dict(blob.pop("vae"))
    c[recipe.denoiser_key].load_state_dict(blob.pop(recipe.denoiser_key))
    c["text_encoder"].load_state_dict(blob.pop("te"))
    legacy = {"scaling_factor": blob.pop("scaling_factor")} if "scaling_factor" in blob else {}
    c["vae"].register_to_config(**blob.pop("vae_calibration", legacy))
    blob.pop("config", None)
    logger.info("resumed from %s at vae step %s, t2v step %s", Path(cfg.work) / "checkpoint.pt", blob.get("vae_step"),
                blob.get("step"))
    return blob


def export(c: dict, cfg: TrainConfig, state: dict, recipe=None) -> Path:
    """Save the EMA weights as a diffusers folder of the family's pipeline (fp16 safetensors) at cfg.out,
    atomically."""
    import copy
    import shutil

    import diffusers
    import torch

    recipe = recipe or UNetRecipe()
    parts = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in c.items()}
    den = parts[recipe.denoiser_key]
    recipe.plain_processors(den)
    if "ema" in state:
        with torch.no_grad():
            for p, s in zip([*den.parameters(), *parts["text_encoder"].parameters()], state["ema"]):
                p.copy_(s)
    pipe = getattr(diffusers, recipe.pipeline_class)(**parts)
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    info = {"vae_steps": state.get("vae_step", 0), "t2v_steps": state.get("step", 0), "config": asdict(cfg)}
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        for f in out.glob("*.md"):  # keep the model card across re-exports
            shutil.copy(f, tmp / f.name)
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("exported %s at t2v step %s", out, state.get("step", 0))
    return out


def _plain_processors(unet) -> dict:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return {n: AttnProcessor2_0() for n in unet.attn_processors}


def model_family(folder: str | Path) -> str | None:
    """The toy-world family of an exported model folder, by its pipeline class (None: not a toy-world pipeline)."""
    try:
        cls = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None
    return {"AnimateDiffPipeline": "animatediff", "WanPipeline": "wan"}.get(cls)


def init_from(c: dict, folder: str | Path, recipe=None) -> dict:
    """Put an exported model's components into `c` (fp16 on disk, trained in fp32) and return the state that
    continues its run: the VAE stage taken as done, the t2v step count from its training.json, no optimizer state
    (a fresh AdamW, warmed up again from that step), the EMA starting from the exported weights."""
    import diffusers
    import torch

    recipe = recipe or UNetRecipe()
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "training.json").is_file():
        raise ValueError(f"--init: {str(folder)!r} is not an exported toy-world model folder "
                         f"(model_index.json and training.json)")
    family = model_family(folder)
    if family != recipe.family:
        raise ValueError(f"--init: {str(folder)!r} is a model of the {family or 'unknown'} family, not of --family "
                         f"{recipe.family}")
    info = json.loads((folder / "training.json").read_text())
    pipe = getattr(diffusers, recipe.pipeline_class).from_pretrained(folder, dtype=torch.float32)
    for name in recipe.components:
        c[name] = getattr(pipe, name)
    step = int(info["t2v_steps"])
    logger.info("starting from %s at t2v step %d (vae steps %s)", folder, step, info["vae_steps"])
    return {"vae_step": int(info["vae_steps"]), "vae_done": True, "step": step, "opt_start": step,
            "init": str(folder)}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) both stages within cfg.budget_s, checkpoint, and export the model folder.

    With cfg.init, the text-to-video stage continues an exported model (see init_from); a work folder that already
    holds a checkpoint of that same continuation resumes it.
    """
    import torch

    recipe = recipe_for(cfg.family)
    cfg = resolved(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    deadline = time.time() + cfg.budget_s
    c = recipe.build(cfg.seed)
    start = init_from(c, cfg.init, recipe) if cfg.init else {}
    state = load_checkpoint(c, cfg, recipe)
    if cfg.init and state and state.get("init") != start["init"]:
        raise ValueError(f"--init: {cfg.work!r} already holds the checkpoint of another run "
                         f"(init {state.get('init')!r}); resume it without --init, or give a new --work")
    state = state or start
    den = c[recipe.denoiser_key]
    for m in (c["vae"], den, c["text_encoder"]):
        m.requires_grad_(True)
    if not state.get("vae_done") and state.get("vae_step", 0) < cfg.vae_steps:
        train_vae(c["vae"], cfg, state, deadline, checkpoint=lambda: save_checkpoint(c, cfg, state, recipe),
                  batch=recipe.vae_batch)
        logger.info("vae calibration %s", recipe.calibrate(c["vae"], cfg))
        save_checkpoint(c, cfg, state, recipe)
    # Frozen from here, and in eval mode whether or not stage 1 ran in this process: a VAE left in train mode
    # after a resume encodes slightly differently (~1e-7), and a resumed run would drift from an uninterrupted one.
    c["vae"].requires_grad_(False).eval()
    if time.time() < deadline:
        train_t2v(c, cfg, state, deadline, recipe)
        save_checkpoint(c, cfg, state, recipe)
    return export(c, cfg, state, recipe)
