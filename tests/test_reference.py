"""Zero-shot references: encoding, the attention processor alone (region, strength, unconditional pass), the control
on the tiny model through `applied` (strength 0 = off, changes when on, everything restored, the write pass: once
per UNet call, with the conditional prompt), and its wiring from a shot through the engine on each family's tiny
model. On Wan: attn1 reading appended reference frames equals a dense masked computation (pooled keys at their own
RoPE positions, the key budget, regions per latent frame), the references' own tokens are those of a pass of their
own, the blank on the unconditional call, and the RoPE time index each reference takes."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import changed
from studio import engine, families, shot as shotlib
from studio.controls import reference
from studio.controls.base import Context, applied, step_end_chain

PROMPT = "a red circle on grass"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    yy, xx = np.mgrid[0:96, 0:160]
    wide = np.stack([xx % 256, yy * 2, np.full_like(xx, 200)], -1).astype(np.uint8)  # 160×96, not square
    Image.fromarray(wide).save(d / "wide.png")
    Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(d / "purple.png")
    (d / "notes.txt").write_text("not an image")
    (d / "fake.png").write_bytes(b"\x89PNG not really")
    return d


@pytest.fixture(scope="module")
def pipe(manager):
    from studio.presets import load_model_preset

    return manager.get(load_model_preset("tiny"))


@pytest.fixture(scope="module")
def purple(pipe, images):
    return reference.encode_reference(pipe, images / "purple.png", 64, 64)


def _ctx(frames=8, size=8, do_cfg=True):
    return Context(frames=frames, latent_h=size, latent_w=size, steps=4, do_cfg=do_cfg,
                   generator=torch.Generator().manual_seed(0))


def _render(pipe, make=lambda ctx: [], prompt=PROMPT):
    """Frames (1, F, H, W, 3) of the tiny model from fixed noise, with the controls make(ctx) applied."""
    ctx = _ctx()
    controls = make(ctx)
    chain = step_end_chain(ctx, controls)
    latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), applied(pipe, controls, ctx):
        return pipe(prompt=prompt, num_frames=8, height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                    latents=latents, generator=torch.Generator().manual_seed(0), output_type="np",
                    callback_on_step_end=lambda p, i, t, kw: {"latents": chain(i, kw["latents"])},
                    callback_on_step_end_tensor_inputs=["latents"]).frames


# --- encoding --------------------------------------------------------------------------------------------------


def test_load_image_covers_and_centre_crops(images):
    img = reference.load_image(images / "wide.png", 64, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # the 160×96 image is scaled to 107×64 and its centre kept: the middle column's red value is the source's middle
    assert abs(int(img[32, 32, 0]) - 80) < 6


def test_encode_reference_gives_a_latent_at_the_shot_size_from_the_centre(pipe, images):
    z = reference.encode_reference(pipe, images / "purple.png", 64, 64)
    assert z.shape == (1, 4, 8, 8) and z.dtype == pipe.vae.dtype and z.device == pipe.vae.device
    assert reference.encode_reference(pipe, images / "wide.png", 48, 32).shape == (1, 4, 4, 6)
    # A 128×64 array at 64×64 keeps its middle 64 columns: the same latent as that square alone.
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    z_wide = reference.encode_reference(pipe, wide, 64, 64)
    assert torch.allclose(z_wide, reference.encode_reference(pipe, np.ascontiguousarray(wide[:, 32:96]), 64, 64))
    assert not torch.allclose(z_wide, reference.encode_reference(pipe, np.ascontiguousarray(wide[:, :64]), 64, 64))


def test_encodings_are_kept_by_content_and_size(pipe, tmp_path, monkeypatch):
    calls = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: calls.append(x.shape) or encode(x))
    path = tmp_path / "ref.png"
    Image.fromarray(np.full((64, 64, 3), (10, 200, 30), np.uint8)).save(path)
    first = reference.encode_reference(pipe, path, 64, 64)
    first.add_(1.0)  # a copy: editing it does not edit what is kept
    again = reference.encode_reference(pipe, path, 64, 64)
    assert len(calls) == 1 and torch.allclose(again + 1.0, first)
    reference.encode_reference(pipe, path, 32, 32)  # another size: encoded
    Image.fromarray(np.full((64, 64, 3), (200, 10, 30), np.uint8)).save(path)  # same name, new content
    changed = reference.encode_reference(pipe, path, 64, 64)
    assert len(calls) == 3 and not torch.allclose(changed, again)


# --- the attention processor alone -----------------------------------------------------------------------------


def _attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4)


def _manual(attn, x, ref, bias):
    """Conditional rows by hand: queries of x (M, N, D) over [x ‖ ref] keys, bias (N,) on every reference key."""
    heads, m, n = attn.heads, x.shape[0], x.shape[1]
    ctx_tokens = torch.cat([x, ref.expand(m, -1, -1)], 1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx_tokens)), split(attn.to_v(ctx_tokens))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (M, heads, N, N + Nr)
    logits[..., n:] += bias[:, None]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(m, n, -1)
    return attn.to_out[0](out)


def _bank(ctl, attn, tokens, name="layer"):
    """Store reference tokens (R, N, D) for layer `name` as a write pass at timestep 0 would, and read them."""
    ctl.bank[name] = reference.RefKeys((0.0,), *ctl.project(attn, tokens))
    ctl.refresh_t = 0.0


def test_processor_reads_the_reference_only_inside_its_region_and_only_on_the_cond_pass():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention()
    ctx = _ctx(frames=2, size=4)
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)  # top-left 2×2 of a 4×4 layer
    ctl = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 4, 4), 1.0, ("box", 0))], unconditional="plain")
    proc = reference.RefSelfAttnProcessor(ctl, "layer")
    ref = torch.randn(1, 16, 8)  # (R, N, D) as a write pass sees them
    _bank(ctl, attn, ref)
    x = torch.randn(4, 16, 8)  # (2 passes · F, N, D)
    plain = AttnProcessor2_0()(attn, x)
    out = proc(attn, x)
    assert torch.equal(out[:2], plain[:2])  # unconditional pass untouched
    inside = torch.tensor([0, 1, 4, 5])
    outside = torch.tensor([i for i in range(16) if i not in (0, 1, 4, 5)])
    assert torch.allclose(out[2:, outside], plain[2:, outside], atol=1e-6)
    assert (out[2:, inside] - plain[2:, inside]).abs().amax(-1).min() > 1e-3  # every inside token changes
    # inside, it is attention over [own ‖ reference] tokens
    assert torch.allclose(out[2:, inside], _manual(attn, x[2:], ref, torch.zeros(16))[:, inside], atol=1e-5)
    # the background region is the complement
    bg = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 4, 4), 1.0, ("outside",))], unconditional="plain")
    _bank(bg, attn, ref)
    out_bg = reference.RefSelfAttnProcessor(bg, "layer")(attn, x)
    assert torch.allclose(out_bg[2:, inside], plain[2:, inside], atol=1e-6)
    assert (out_bg[2:, outside] - plain[2:, outside]).abs().amax(-1).min() > 1e-3
    # the biases follow the boxes from step to step (the camera moves them); unchanged boxes reuse them
    bias = ctl.query_channels(1, 16, 1, 4, 1, torch.float32, x.device)
    ctx.step = 1
    assert ctl.query_channels(1, 16, 1, 4, 1, torch.float32, x.device) is bias
    ctx.boxes[0] = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)  # now the bottom-right 2×2
    ctx.step = 2
    moved = proc(attn, x)
    assert torch.allclose(moved[2:, inside], plain[2:, inside], atol=1e-6)
    assert (moved[2:, [10, 11, 14, 15]] - plain[2:, [10, 11, 14, 15]]).abs().amax(-1).min() > 1e-3
    # a subject without boxes reads its reference everywhere
    ctx.boxes.clear()
    ctx.step = 3
    everywhere = proc(attn, x)
    assert torch.allclose(everywhere[2:], _manual(attn, x[2:], ref, torch.zeros(16)), atol=1e-5)


def test_processor_strength_is_a_log_bias_and_without_cfg_every_row_reads():
    attn = _attention()
    ctx = _ctx(frames=2, size=4, do_cfg=False)
    ref = torch.randn(1, 16, 8)
    x = torch.randn(2, 16, 8)  # one video of 2 frames, conditional only
    outs = {}
    for s in (0.5, 3.0):
        ctl = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 4, 4), s, ("all",))])
        _bank(ctl, attn, ref)
        outs[s] = reference.RefSelfAttnProcessor(ctl, "layer")(attn, x)
        assert torch.allclose(outs[s], _manual(attn, x, ref, torch.full((16,), math.log(s))), atol=1e-5)
    assert not torch.allclose(outs[0.5], outs[3.0], atol=1e-3)


def _dense(attn, x, refs, biases):
    """Attention by hand with the whole logit matrix: queries x (M, N, D) over [own ‖ refs (M, K, D)] keys, the
    (M, N, K) additive bias on the reference keys (the formulation the bias channels replace)."""
    m, n, _ = x.shape
    ctx_tokens = torch.cat([x, refs], 1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx_tokens)), split(attn.to_v(ctx_tokens))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (M, heads, N, N + K)
    logits[..., n:] += biases[:, None]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(m, n, -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("unconditional", ["plain", "blank"])
@pytest.mark.parametrize("temporal", [False, True])
def test_processor_equals_dense_masked_attention_with_two_pooled_references_and_boxes(temporal, unconditional):
    from diffusers.models.attention_processor import AttnProcessor2_0, Attention

    torch.manual_seed(1)
    attn = Attention(query_dim=12, heads=3, dim_head=4)
    F_, R, n = 3, 2, 64  # an 8×8 layer; references pooled 2×2 to 16 keys each (group 4)
    ctx = Context(frames=F_, latent_h=8, latent_w=8, steps=4, do_cfg=True, generator=torch.Generator().manual_seed(0))
    ctx.boxes[0] = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]])
    strengths = (2.5, 0.7)
    ctl = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 8, 8), strengths[0], ("box", 0)),
                                             (torch.zeros(1, 4, 8, 8), strengths[1], ("outside",))],
                                       temporal, max_tokens=16, unconditional=unconditional)
    proc = reference.RefSelfAttnProcessor(ctl, "layer")
    if temporal:  # each video: F generated frames, then its R reference frames
        ctx.extra_frames = R
        x = torch.randn(2 * (F_ + R), n, 12)
        videos = x.view(2, F_ + R, n, 12)
        refs, blank = videos[1, F_:], videos[0, F_:]  # (R, N, D): the conditional video's; the unconditional's
    else:
        x = torch.randn(2 * F_, n, 12)
        videos = x.view(2, F_, n, 12)
        refs, blank = torch.randn(R, n, 12), torch.randn(1, n, 12).expand(R, -1, -1)  # one blank for the R
        tokens = torch.cat([blank[:1], refs]) if unconditional == "blank" else refs
        _bank(ctl, attn, tokens)
    out = proc(attn, x).view(2, -1, n, 12)

    def pool(t):  # (R, N, D) -> (1, R·16, D)
        return torch.nn.functional.avg_pool2d(t.transpose(1, 2).reshape(R, 12, 8, 8), 2).flatten(2).transpose(
            1, 2).reshape(1, R * 16, 12)

    inside = reference.box_masks(ctx.boxes[0], 8, 8)  # (F, N)
    allowed = torch.stack([inside, ~inside], 2)  # (F, N, R): subject inside its box, background outside
    bias = torch.where(allowed, torch.log(torch.tensor(strengths) * 4), torch.tensor(-1e4)).repeat_interleave(16, 2)
    plain = AttnProcessor2_0()(attn, x).view(2, -1, n, 12)
    assert torch.allclose(out[1, :F_], _dense(attn, videos[1, :F_], pool(refs).expand(F_, -1, -1), bias), atol=1e-5)
    if unconditional == "blank":  # the unconditional frames read the blank(s) with the same biases
        expected = _dense(attn, videos[0, :F_], pool(blank).expand(F_, -1, -1), bias)
        assert torch.allclose(out[0, :F_], expected, atol=1e-5)
    else:
        assert torch.equal(out[0, :F_], plain[0, :F_])
    if temporal:
        assert torch.equal(out[:, F_:], plain[:, F_:])  # the reference frames themselves: plain


def test_strength_zero_installs_nothing_and_bad_items_are_refused():
    ctx = _ctx()
    z = torch.zeros(1, 4, 8, 8)
    off = reference.ReferenceInjection(ctx, [(z, 0.0, ("box", 0)), (z, 0.0, ("outside",))])
    assert not off.active and off.processors(None) == {} and off.hooks(None) == []
    half = reference.ReferenceInjection(ctx, [(z, 0.0, ("box", 0)), (z, 2.0, ("outside",))])
    assert half.latents.shape[0] == 1 and half.regions == [("outside",)] and half.strengths == [2.0]
    for bad in ([], [(z, -1.0, ("all",))], [(z, float("nan"), ("all",))], [(z, 1.0, ("box",))],
                [(z, 1.0, ("inside", 0))], [(z[0], 1.0, ("all",))], [(z[..., :4], 1.0, ("all",))]):
        with pytest.raises(ValueError):
            reference.ReferenceInjection(ctx, bad)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens"):
            reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))], max_tokens=bad)


def test_key_budget_is_a_share_of_the_layer_within_a_floor_and_max_tokens():
    ctx = _ctx()
    z = torch.zeros(1, 4, 8, 8)
    ctl = reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))])  # defaults: 1/16 of the layer, 16..64 keys
    assert [ctl.key_budget(n) for n in (16, 64, 256, 1024, 4096)] == [16, 16, 16, 64, 64]
    wide = reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))], max_tokens=256, token_ratio=4)
    assert [wide.key_budget(n) for n in (16, 64, 256, 4096)] == [16, 16, 64, 256]
    assert reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))], max_tokens=4).key_budget(4096) == 4
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="token_ratio"):
            reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))], token_ratio=bad)


def test_pooling_keeps_at_most_max_tokens_keys_each_standing_for_its_group():
    tokens = torch.arange(2 * 64 * 3, dtype=torch.float32).view(2, 64, 3)  # (M, N, D) on an 8×8 grid
    assert reference.pool_tokens(tokens, 8, 8)[1] == 1  # 64 <= MAX_REF_TOKENS: kept
    pooled, group = reference.pool_tokens(tokens, 8, 8, max_tokens=16)
    assert pooled.shape == (2, 16, 3) and group == 4
    grid = tokens.view(2, 8, 8, 3)
    assert torch.allclose(pooled[:, 0], grid[:, :2, :2].mean((1, 2)))  # the top-left 2×2 block's mean
    assert reference.pool_tokens(tokens, 8, 8, max_tokens=1)[0].shape == (2, 1, 3)


# --- the control on the tiny model ------------------------------------------------------------------------------


def _state(pipe):
    unet = pipe.unet
    return ({n: type(p) for n, p in unet.attn_processors.items()}, dict(unet._forward_pre_hooks),
            dict(unet._forward_hooks))


@pytest.mark.parametrize("temporal", [False, True])
def test_strength_zero_is_plain_one_changes_the_render_and_all_is_restored(pipe, purple, temporal):
    before = _state(pipe)
    assert not before[1] and not before[2]
    plain = _render(pipe)
    off = _render(pipe, lambda ctx: [reference.ReferenceInjection(ctx, [(purple, 0.0, ("all",))], temporal)])
    assert np.abs(off - plain).max() <= 1e-6
    on = _render(pipe, lambda ctx: [reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))], temporal)])
    assert on.shape == plain.shape and np.abs(on - plain).mean() > 1e-3
    assert _state(pipe) == before  # processor types, no hooks left
    assert np.array_equal(_render(pipe), plain)  # a plain render after is the plain render before


def test_temporal_mode_appends_the_reference_as_a_frame_and_differs_from_excluded(pipe, purple):
    seen = []  # the UNet's first layer input: (videos · frames, C, h, w)
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        ex = _render(pipe, lambda ctx: [reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))], False)])
        # main calls: 2 videos × 8 frames; write passes: the blank and the reference, 1 frame each
        assert {x.shape[0] for x in seen} == {16, 2}
        seen.clear()
        tm = _render(pipe, lambda ctx: [reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))], True)])
    finally:
        handle.remove()
    assert len(seen) == 4 and all(x.shape[0] == 2 * 9 for x in seen)  # one extra frame per video, no write pass
    x = seen[0].view(2, 9, *seen[0].shape[1:])
    assert torch.equal(x[0, 8], torch.zeros_like(x[0, 8]))  # the unconditional video's reference frame is blank
    assert torch.allclose(x[1, 8], purple[0].to(x.dtype))  # the conditional video's is the clean reference
    assert tm.shape == ex.shape and not np.allclose(ex, tm, atol=1e-4)


def test_a_box_region_changes_less_than_everywhere(pipe, purple):
    plain = _render(pipe)

    def boxed(ctx):
        ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.25, 0.25]] * 8)
        return [reference.ReferenceInjection(ctx, [(purple, 1.0, ("box", 0))])]

    small = np.abs(_render(pipe, boxed) - plain).mean()
    full = np.abs(_render(pipe, lambda ctx: [reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))])])
                  - plain).mean()
    assert 0 < small < full


@pytest.fixture
def no_kept_banks(monkeypatch):
    """Write passes are not answered from earlier renders' banks (tests of the passes themselves)."""
    monkeypatch.setattr(reference, "BANKS_KEPT", 0)


@pytest.mark.parametrize("unconditional", ["plain", "blank"])
def test_write_pass_runs_once_per_refresh_with_the_conditional_prompt(pipe, purple, unconditional, no_kept_banks):
    calls = []  # (frames, text) of every UNet call, write passes included

    def spy(module, args, kwargs):
        calls.append((args[0].shape[2], kwargs["encoder_hidden_states"].clone()))

    stored = {}
    for every in (1, 2):
        for prompt in (PROMPT, "a white star on sky"):
            made = []

            def make(ctx):
                made.append(reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))], refresh_every=every,
                                                         unconditional=unconditional))
                return made

            calls.clear()
            handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
            try:
                _render(pipe, lambda ctx: make(ctx), prompt=prompt)
            finally:
                handle.remove()
            ctl = made[0]
            writes = [text for frames, text in calls if frames == 1]
            mains = [text for frames, text in calls if frames == 8]
            assert len(mains) == 4 and len(writes) == ctl.write_calls == 4 // every
            # each write pass got the main call's conditional text (the last of its per-frame rows) for the
            # reference, after the unconditional text (the first row) for the blank when there is one
            for w, m in zip(writes, mains[::every]):
                assert torch.equal(w[-1], m[-1])
                assert w.shape[0] == 1 if unconditional == "plain" else (w.shape[0] == 2 and torch.equal(w[0], m[0]))
            assert not torch.equal(mains[0][0], mains[0][-1])  # the two texts differ
            assert not ctl.bank  # freed by close()
            stored[(every, prompt)] = mains[0][-1]
    assert not torch.equal(stored[(1, PROMPT)], stored[(1, "a white star on sky")])


def test_write_passes_of_every_refresh_run_ahead_in_one_batch_with_the_same_tokens(pipe, purple, no_kept_banks):
    """With the schedule known, the refresh steps' write passes are one UNet call of R·K one-frame videos (at most
    the main call's rows per call), and the render matches the one-pass-per-refresh render."""
    items = [(purple, 1.0, ("all",)), (purple.flip(-1), 2.0, ("outside",))]  # R = 2
    for every in (1, 2):
        made = {}

        def make(ctx, key, schedule):
            made[key] = reference.ReferenceInjection(ctx, items, refresh_every=every, schedule=schedule)
            return [made[key]]

        apart = _render(pipe, lambda ctx: make(ctx, "apart", None))
        ahead = _render(pipe, lambda ctx: make(ctx, "ahead", lambda: pipe.scheduler.timesteps))
        assert made["apart"].write_calls == 4 // every and made["ahead"].write_calls == 1
        assert np.abs(ahead - apart).max() < 1e-4
    # the batch is split to at most `rows` one-frame videos a call; every layer keeps each timestep's keys in order
    ctl = reference.ReferenceInjection(_ctx(), items, unconditional="plain")
    sample, text = torch.zeros(2, 4, 8, 8, 8), pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    with torch.inference_mode(), applied(pipe, [ctl], ctl.ctx):
        ctl._write_pass(pipe.unet, sample, [900.0, 600.0, 300.0], text, None, rows=4)
        whole = {k: v.keys.clone() for k, v in ctl.bank.items()}
        assert ctl.write_calls == 2  # 2 timesteps of 2 references, then 1
        for k, v in ctl.bank.items():
            assert v.times == (900.0, 600.0, 300.0) and v.keys.shape[0] == 3
        ctl._write_pass(pipe.unet, sample, [600.0], text, None, rows=16)
    assert all(torch.allclose(whole[k][1:2], v.keys, atol=1e-5) for k, v in ctl.bank.items())


def test_stored_reference_tokens_depend_on_the_prompt(pipe, purple):
    banks = {}
    for prompt in (PROMPT, "a white star on sky"):
        ctx = _ctx()
        ctl = reference.ReferenceInjection(ctx, [(purple, 1.0, ("all",))])
        latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), applied(pipe, [ctl], ctx):
            pipe(prompt=prompt, num_frames=8, height=64, width=64, num_inference_steps=1, guidance_scale=7.5,
                 latents=latents, output_type="latent")
            banks[prompt] = {k: v.keys.clone() for k, v in ctl.bank.items()}
    a, b = banks.values()
    assert set(a) == set(reference.spatial_self_attention_names(pipe.unet))
    assert all(v.shape[0] == 1 and v.shape[2] <= reference.MAX_REF_TOKENS for v in a.values())  # (K, heads, N', ·)
    deep = [k for k in a if "up_blocks" in k]  # after cross-attention, the stored keys depend on the prompt
    assert deep and any(not torch.allclose(a[k], b[k]) for k in deep)


# --- through a shot and the engine -------------------------------------------------------------------------------


def _shot(tiny_shot, **subject):
    s = shotlib.from_container(shotlib.to_dict(tiny_shot))
    s.subjects = [shotlib.Subject(phrase="red circle", **subject)] if subject else []
    return s


def _installed(manager, shot):
    d = families.denoiser(manager.get(engine.prepare(shot)[1]))
    return dict(d.attn_processors), dict(d._forward_pre_hooks), dict(d._forward_hooks)


def test_a_shot_reference_reaches_the_render_and_strength_zero_is_off(images, model_shot, manager):
    tiny_shot = model_shot
    plain = engine.render(_shot(tiny_shot), manager).frames
    before = _installed(manager, tiny_shot)
    off = engine.render(_shot(tiny_shot, reference=str(images / "purple.png"), reference_strength=0.0), manager)
    assert off.info["controls"] == ["reference"] and np.array_equal(off.frames, plain)
    s = _shot(tiny_shot, reference=str(images / "purple.png"))
    for temporal in (False, True):
        s.reference_control.temporal_attention = temporal
        if temporal and tiny_shot.model == "tiny-wan":  # attn1 is joint over frames: nothing separate to join
            with pytest.raises(shotlib.ShotError, match="reference_control.temporal_attention: .*valid here: false"):
                engine.render(s, manager)
            continue
        on = engine.render(s, manager).frames
        assert changed(plain, on, tiny_shot.model)
    assert _installed(manager, tiny_shot) == before  # processors and hooks restored
    assert np.array_equal(engine.render(_shot(tiny_shot), manager).frames, plain)  # restored


def test_shot_settings_unconditional_and_max_tokens_reach_the_control(images, model_shot, manager):
    tiny_shot = model_shot
    s = _shot(tiny_shot, reference=str(images / "purple.png"))
    blank = engine.render(s, manager).frames
    s.reference_control.unconditional = "plain"
    plain = engine.render(s, manager).frames
    s.reference_control.max_tokens = 4  # pooled harder than the default budget (16 keys on 8x8 layers and Wan's 4x4)
    pooled = engine.render(s, manager).frames
    assert not np.array_equal(blank, plain) and not np.array_equal(plain, pooled)
    s.reference_control.max_tokens, s.reference_control.token_ratio = 64, 1  # a budget of 64 keys: no pooling
    unpooled = engine.render(s, manager).frames
    assert not np.array_equal(unpooled, pooled)
    # tiny's 8x8 layers are pooled to 16 keys by default; a Wan latent frame of 4x4 tokens is within the budget
    assert np.array_equal(unpooled, plain) == (tiny_shot.model == "tiny-wan")


def test_supports_video_unets_only(pipe):
    assert reference.supports(pipe.unet)
    assert not reference.supports(pipe.vae)


@pytest.mark.parametrize("name, problem", [("notes.txt", "must be an image"), ("fake.png", "not a readable image"),
                                           ("missing.png", "image file not found")])
def test_bad_reference_files_are_named(images, tiny_shot, name, problem):
    s = _shot(tiny_shot, reference=str(images / name))
    with pytest.raises(shotlib.ShotError, match=rf"subjects\[0\]\.reference: {problem}"):
        engine.prepare(s)
    s = _shot(tiny_shot)
    s.background.reference = str(images / name)
    with pytest.raises(shotlib.ShotError, match=rf"background\.reference: {problem}"):
        engine.prepare(s)


def test_huge_reference_is_refused(tmp_path, tiny_shot):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 10)).save(big)
    s = _shot(tiny_shot, reference=str(big))
    with pytest.raises(shotlib.ShotError, match="at most 4096"):
        engine.prepare(s)


# --- Wan: attn1 reading appended reference frames ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_pipe():
    from studio.families import wan_build

    return wan_build.build_pipeline()


def _wan_ctx(frames=3, h=8, w=8):
    return Context(frames=4 * frames - 3, latent_h=h, latent_w=w, steps=4, do_cfg=True, latent_frames=frames,
                   generator=torch.Generator().manual_seed(0), cfg_batched=False, temporal=4)


def _wan_refs(ctx, tr, max_tokens=4, **kw):
    from studio.controls.wan_attention import WanReferenceInjection

    torch.manual_seed(1)
    items = [(torch.randn(1, 16, ctx.latent_h, ctx.latent_w), 2.0, ("box", 0)),
             (torch.randn(1, 16, ctx.latent_h, ctx.latent_w), 0.5, ("outside",))]
    return WanReferenceInjection(ctx, items, tr.rope, tr.config.patch_size, max_tokens=max_tokens, token_ratio=1, **kw)


def test_pooled_reference_keys_get_rope_positions_of_their_own(wan_pipe):
    from studio.controls.wan_attention import rope_at

    tr = wan_pipe.transformer
    cos, sin = tr.rope(torch.zeros(1, 16, 3, 8, 12))  # the transformer's table: 3 frames of 4×6 tokens
    t, y, x = (g.flatten().double() for g in torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(6),
                                                             indexing="ij"))
    assert all(torch.equal(a, b) for a, b in zip((cos, sin), rope_at(tr.rope, t, y, x)))  # equal at integers
    ctl = _wan_refs(_wan_ctx(), tr)
    c, _ = ctl.pooled_rope(3, 4, 4, 2, "cpu")  # 2 references, 2×2 pooled keys each
    want, _ = rope_at(tr.rope, torch.tensor([3.0] * 4 + [4.0] * 4), torch.tensor([0.5, 0.5, 2.5, 2.5] * 2),
                      torch.tensor([0.5, 2.5, 0.5, 2.5] * 2))
    assert torch.equal(c, want)  # reference r at time F' + r, each key at the centre of the 2×2 tokens it pools


def test_wan_reference_attention_equals_a_dense_masked_computation(wan_pipe):
    from studio.controls import wan_attention as wa
    from studio.controls.boxes import NEG, box_masks

    tr = wan_pipe.transformer
    T, R, n2 = 3, 2, 16
    ctx = _wan_ctx()
    ctx.boxes[0] = torch.from_numpy(__import__("studio.controls.boxes", fromlist=["interpolate"]).interpolate(
        {0: [0.0, 0.0, 0.5, 0.5], 8: [0.5, 0.5, 1.0, 1.0]}, 9))
    ctl = _wan_refs(ctx, tr)
    assert ctl.key_budget(n2) == 4
    proc = ctl.processors(tr)["blocks.0.attn1.processor"]
    attn = tr.blocks[0].attn1
    torch.manual_seed(2)
    x = torch.randn(1, (T + R) * n2, 24)
    rot = tr.rope(torch.zeros(1, 16, T + R, 8, 8))
    ctl.appended = R
    out = proc(attn, x, None, None, rot)
    # dense: every query against [video | pooled refs | refs' own tokens] with an explicit (S, Sk) mask
    q, k, v = wa._qkv(attn, x, x)
    q, k = wa.rotate(q, *rot), wa.rotate(k, *rot)
    grid = x[:, T * n2:].reshape(R, 4, 4, 24).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(1, R * 4, 24)
    kp = wa.rotate(wa._heads(attn.norm_k(attn.to_k(pooled)), 2), *ctl.pooled_rope(T, 4, 4, 2, "cpu"))
    vp = wa._heads(attn.to_v(pooled), 2)
    K = torch.cat([k[:, :T * n2], kp, k[:, T * n2:]], 1).transpose(1, 2)
    V = torch.cat([v[:, :T * n2], vp, v[:, T * n2:]], 1).transpose(1, 2)
    nv, Sk = T * n2, K.shape[2]
    mask = torch.full((x.shape[1], Sk), float("-inf"))
    mask[:nv, :nv] = 0
    per_frame = box_masks(ctx.boxes[0], 4, 4)
    inside = torch.stack([per_frame[g].any(0) for g in ([0], [1, 2, 3, 4], [5, 6, 7, 8])]).flatten()  # (F'·n2,)
    for r, (strength, region) in enumerate([(2.0, inside), (0.5, ~inside)]):
        mask[:nv, nv + 4 * r:nv + 4 * (r + 1)] = torch.where(region, math.log(strength * 4), NEG)[:, None]
        own = nv + 4 * R + n2 * r
        mask[nv + n2 * r:nv + n2 * (r + 1), own:own + n2] = 0  # a reference's tokens read only themselves
    logits = q.transpose(1, 2) @ K.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    dense = wa._out(attn, torch.softmax(logits, -1) @ V, q)
    assert torch.allclose(out, dense, atol=1e-5)


def test_appended_reference_tokens_are_those_of_a_pass_of_their_own(wan_pipe):
    """Inside the render's call each reference reads only itself, under the call's prompt and timestep: its output
    is the transformer's output for the reference alone (a one-frame video at time index 0: RoPE is relative)."""
    tr = wan_pipe.transformer
    ctx = _wan_ctx()
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 9)
    ctl = _wan_refs(ctx, tr, max_tokens=64)
    torch.manual_seed(3)
    video, text, t = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 512, 32), torch.tensor([700.0])
    refs = ctl.latents.transpose(0, 1)[None]  # (1, C, R, h, w)
    orig = dict(tr.attn_processors)
    try:
        tr.set_attn_processor({**orig, **ctl.processors(tr)})
        ctl.appended = 2
        with torch.no_grad():
            joint = tr(torch.cat([video, refs], 2), t, text, return_dict=False)[0]
    finally:
        tr.set_attn_processor(dict(orig))
        ctl.appended = 0
    with torch.no_grad():
        for r in range(2):
            alone = tr(refs[:, :, r:r + 1], t, text, return_dict=False)[0]
            assert torch.allclose(joint[:, :, 3 + r:4 + r], alone, atol=1e-4)
        plain = tr(video, t, text, return_dict=False)[0]
    assert (joint[:, :, :3] - plain).abs().max() > 1e-3  # and the video did read them


def test_the_unconditional_call_reads_a_blank_or_nothing(wan_pipe):
    tr = wan_pipe.transformer
    sample = torch.randn(1, 16, 3, 8, 8)
    for unconditional, cond, appended in (("blank", True, "refs"), ("blank", False, "zeros"),
                                          ("plain", False, None)):
        ctx = _wan_ctx()
        ctl = _wan_refs(ctx, tr, unconditional=unconditional)
        ctx.cond_call = cond
        got = ctl._append(tr, (), {"hidden_states": sample, "timestep": torch.tensor([1.0])})
        if appended is None:
            assert got is None and ctl.appended == 0 and ctx.extra_frames == 0
            continue
        new = got[1]["hidden_states"]
        assert new.shape == (1, 16, 5, 8, 8) and ctl.appended == ctx.extra_frames == 2
        assert torch.equal(new[:, :, :3], sample)
        want = ctl.latents.transpose(0, 1)[None] if appended == "refs" else torch.zeros(1, 16, 2, 8, 8)
        assert torch.equal(new[:, :, 3:], want)
        out = ctl._strip(tr, (), {}, (torch.randn(1, 16, 5, 8, 8),))
        assert out[0].shape == (1, 16, 3, 8, 8) and ctx.extra_frames == 0
    # per-token timesteps (Wan 2.2 TI2V): the references' tokens get the call's timestep
    ctl = _wan_refs(_wan_ctx(), tr)
    got = ctl._append(tr, (), {"hidden_states": sample, "timestep": torch.full((1, 48), 7.0)})
    assert torch.equal(got[1]["timestep"], torch.full((1, 48 + 2 * 16), 7.0))


def test_references_past_the_rope_table_are_refused_naming_frames_and_references():
    from types import SimpleNamespace

    from studio.controls.wan_attention import check_reference_positions

    tr = SimpleNamespace(config=SimpleNamespace(rope_max_seq_len=32))
    assert check_reference_positions(tr, 21, 5) is None
    why = check_reference_positions(tr, 29, 5)
    assert "29 latent frames + 5 reference(s) exceed the 32 time positions" in why


# --- the write passes of earlier renders -------------------------------------------------------------------------


def test_a_re_render_reuses_the_write_pass_bit_for_bit_and_any_change_runs_it_again(purple, monkeypatch):
    """A render that makes the same write pass as an earlier one (same references, prompts, timesteps, weights,
    adapters) takes its keys and values instead of running it; the frames are the same bit for bit as with the
    pass run. A changed reference, prompt, schedule, weight in place, or LoRA state runs the pass again."""
    from peft import LoraConfig, inject_adapter_in_model

    from studio.pipelines import PipelineManager
    from studio.presets import load_model_preset
    from studio.subjects.apply import _set_lora_enabled

    made = []
    real_init = reference.ReferenceInjection.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(reference.ReferenceInjection, "__init__", spy)
    pipe = PipelineManager(1, "cpu").get(load_model_preset("tiny"))  # a pipeline of its own

    def render(ref=purple, prompt=PROMPT, steps=4, every=2):
        made.clear()
        ctx = _ctx()
        ctx.steps = steps
        controls = [reference.ReferenceInjection(ctx, [(ref, 1.0, ("all",))], refresh_every=every,
                                                 schedule=lambda: pipe.scheduler.timesteps)]
        chain = step_end_chain(ctx, controls)
        latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), applied(pipe, controls, ctx):
            frames = pipe(prompt=prompt, num_frames=8, height=64, width=64, num_inference_steps=steps,
                          guidance_scale=7.5, latents=latents, output_type="np",
                          callback_on_step_end=lambda p, i, t, kw: {"latents": chain(i, kw["latents"])},
                          callback_on_step_end_tensor_inputs=["latents"]).frames
        return frames, made[0].write_calls, made[0].bank_hits

    with monkeypatch.context() as m:  # nothing kept: the pass runs
        m.setattr(reference, "BANKS_KEPT", 0)
        unkept, calls, hits = render()
        assert (calls, hits) == (1, 0)
    monkeypatch.setattr(reference, "BANKS_KEPT", 8)  # room for every variant below
    first, calls, hits = render()
    assert (calls, hits) == (1, 0) and np.array_equal(first, unkept)
    again, calls, hits = render()
    assert (calls, hits) == (0, 1) and np.array_equal(again, first)  # the kept bank: the same frames
    for change in (dict(ref=purple.flip(-1)), dict(prompt="a white star on sky"), dict(steps=3), dict(every=1)):
        frames, calls, hits = render(**change)
        assert calls >= 1 and hits == 0, change
    assert render()[1:] == (0, 1)  # the first render's bank is still kept
    unet = pipe.unet
    with torch.no_grad():
        unet.conv_in.bias.add_(0.01)  # a weight changed in place
    changed, calls, _ = render()
    assert calls == 1 and not np.array_equal(changed, first)
    assert render()[1:] == (0, 1)
    with torch.random.fork_rng():  # a LoRA adapter injected (its B is zero: same output, other state)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), unet, adapter_name="x")
    frames, calls, _ = render()
    assert calls == 1 and np.array_equal(frames, changed)
    _set_lora_enabled(unet, False)
    assert render()[1] == 1  # switched off: another state again
