"""Box trajectories: keyframe interpolation, masks at a layer's grid, phrase token lookup, the logit bias, the
processor against plain attention, and the control end to end on each family's tiny model (changes with, identical
without, restored after). On Wan: phrase tokens by the tokenizer's offsets, one box per latent frame (the union of its
frames' boxes), the attn2 processor (a zero bias is the stock output; only the conditional call is edited)."""

import numpy as np
import pytest
import torch

from conftest import changed
from studio import engine, families, shot as shotlib
from studio.controls import boxes
from studio.controls.base import Context
from studio.toyworld import model as toymodel


def test_linear_interpolation_between_and_beyond_keyframes():
    b = boxes.interpolate({2: [0.0, 0.0, 0.2, 0.2], 6: [0.4, 0.2, 0.6, 0.6]}, frames=8)
    assert b.shape == (8, 4)
    assert np.allclose(b[0], [0, 0, 0.2, 0.2]) and np.allclose(b[1], b[0])  # holds before the first key
    assert np.allclose(b[4], [0.2, 0.1, 0.4, 0.4])  # halfway
    assert np.allclose(b[7], [0.4, 0.2, 0.6, 0.6])  # holds after the last key
    assert np.allclose(boxes.interpolate({3: [0.1, 0.1, 0.3, 0.3]}, 5), [[0.1, 0.1, 0.3, 0.3]] * 5)


def test_smooth_interpolation_eases_but_meets_the_keyframes():
    keys = {0: [0.0, 0.0, 0.2, 0.2], 8: [0.8, 0.0, 1.0, 0.2]}
    lin, smooth = boxes.interpolate(keys, 9), boxes.interpolate(keys, 9, "smooth")
    assert np.allclose(smooth[[0, 4, 8]], lin[[0, 4, 8]])  # same ends and midpoint
    assert smooth[1, 0] < lin[1, 0] and smooth[7, 0] > lin[7, 0]  # slower start and end
    assert (np.diff(smooth[:, 0]) >= 0).all()


def test_box_masks_on_a_layer_grid():
    m = boxes.box_masks(torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.01, 0.01]]), rows=4, cols=4)
    grid = m.view(2, 4, 4)
    assert grid[0].int().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]
    assert grid[1].sum() == 1 and grid[1, 0, 0]  # a tiny box still covers one token


def test_phrase_tokens_found_by_position_including_multi_piece_words():
    tok = toymodel.build_tokenizer()
    prompt = "a purple square and a yellow star moving left on sand"
    assert boxes.phrase_token_indices(tok, prompt, "yellow star") == [6, 7]  # BOS at 0
    assert boxes.phrase_token_indices(tok, prompt, "purple square") == [2, 3]
    # a word outside the world's vocabulary is several BPE pieces: all of them are found
    pieces = tok("zebracorn", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    idx = boxes.phrase_token_indices(tok, "a zebracorn on grass", "zebracorn")
    assert idx == list(range(2, 2 + len(pieces)))
    assert boxes.word_token_indices(tok, "a red circle") == [1, 2, 3]
    with pytest.raises(ValueError, match="not among"):
        boxes.phrase_token_indices(tok, "a red circle", "blue square")


def test_repeated_phrases_take_their_occurrences_in_order():
    tok = toymodel.build_tokenizer()
    prompt = "a red circle and a red circle on grass"
    assert boxes.phrase_occurrences(tok, prompt, "red circle") == [[2, 3], [6, 7]]
    assert boxes.phrase_token_indices(tok, prompt, "red circle", occurrence=1) == [6, 7]
    with pytest.raises(ValueError, match="occurs 2 time"):
        boxes.phrase_token_indices(tok, prompt, "red circle", occurrence=2)
    # "a a a" holds "a a" once without overlap
    assert boxes.phrase_occurrences(tok, "a a a", "a a") == [[1, 2]]
    assert boxes.assign_phrases(tok, prompt, {0: "red circle", 1: "red circle"}) == {0: [2, 3], 1: [6, 7]}


def test_a_phrase_inside_another_gets_an_occurrence_of_its_own():
    tok = toymodel.build_tokenizer()
    got = boxes.assign_phrases(tok, "a red circle and a circle on grass", {0: "circle", 1: "red circle"})
    assert got == {0: [6], 1: [2, 3]}  # not the "circle" of "red circle"


def test_a_subject_without_tokens_of_its_own_is_refused_by_name():
    tok = toymodel.build_tokenizer()
    with pytest.raises(boxes.PhraseError, match=r"already taken by subjects\[0\] \('red circle'\)") as e:
        boxes.assign_phrases(tok, "a red circle on grass", {0: "red circle", 1: "red circle"})
    assert e.value.index == 1
    with pytest.raises(boxes.PhraseError, match="not among") as e:
        boxes.assign_phrases(tok, "a red circle on grass", {0: "red circle", 1: "blue star"})
    assert e.value.index == 1
    # a subject that need not have tokens (no boxes) only takes what is free
    assert boxes.assign_phrases(tok, "a red circle on grass", {0: "red circle", 1: "circle"}, required=[0]) == {
        0: [2, 3]}


def test_two_subjects_with_one_phrase_get_their_own_tokens_in_a_render(model_shot, manager):
    from studio.controls import compose

    tiny_shot = model_shot
    tiny_shot.prompt = "a red circle and a red circle on grass"
    tiny_shot.subjects = [shotlib.Subject(phrase="red circle", boxes={0: [0.0, 0.0, 0.4, 0.4]}),
                          shotlib.Subject(phrase="red circle", boxes={0: [0.6, 0.6, 1.0, 1.0]})]
    shot, preset = engine.prepare(tiny_shot)
    pipe = manager.get(preset)
    ctx = compose.context(shot, 8, 8)
    (ctl,) = compose.build(shot, pipe, ctx)
    # CLIP puts its start token at 0; UMT5 has none
    assert ctl.tracks == ({0: [2, 3], 1: [6, 7]} if shot.model == "tiny" else {0: [1, 2], 1: [5, 6]})
    shot.prompt = "a red circle on grass"  # one occurrence for two subjects: refused, naming the second
    with pytest.raises(shotlib.ShotError, match=r"subjects\[1\]\.phrase: .*already taken by subjects\[0\]"):
        compose.build(shot, pipe, compose.context(shot, 8, 8))


def _ctx(frames=2, h=4, w=4, step=0):
    return Context(frames=frames, latent_h=h, latent_w=w, steps=10, do_cfg=True,
                   generator=torch.Generator().manual_seed(0), step=step)


def test_bias_amplifies_inside_and_suppresses_outside():
    ctx = _ctx()
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)  # top-left quarter: 4 of 16 tokens
    ctl = boxes.BoxAttention(ctx, {0: [2, 3]}, words=[1, 2, 3, 4], strength=10.0, amplify_steps=3)
    b = ctl.bias(16, 8, torch.float32, "cpu")  # (F, N, L)
    inside, outside = 0, 15  # token (0, 0) and token (3, 3)
    assert b[0, inside, 2] == pytest.approx(10.0 * (1 - 4 / 16))
    assert b[0, outside, 2] == boxes.NEG  # the phrase outside its box
    assert b[0, inside, 1] == boxes.NEG and b[0, inside, 4] == boxes.NEG  # other words everywhere (all_words)
    assert (b[:, :, 0] == 0).all() and (b[:, :, 5:] == 0).all()  # start, end and padding untouched
    ctx.step = 3  # amplification over; suppression stays
    b = ctl.bias(16, 8, torch.float32, "cpu")
    assert b[0, inside, 2] == 0 and b[0, outside, 2] == boxes.NEG
    # subject_words keeps the other words
    soft = boxes.BoxAttention(ctx, {0: [2, 3]}, words=[1, 2, 3, 4], suppress="subject_words").bias(16, 8, torch.float32, "cpu")
    assert (soft[:, :, [1, 4]] == 0).all() and soft[0, outside, 3] == boxes.NEG


def test_processor_edits_only_the_conditional_rows():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    ctx = _ctx(frames=2)
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)
    proc = boxes.BoxAttnProcessor(boxes.BoxAttention(ctx, {0: [1]}, words=[1, 2], amplify_steps=5))
    x, text = torch.randn(4, 16, 8), torch.randn(4, 5, 6)  # (2 passes · F, N, C), (·, L, D)
    plain = AttnProcessor2_0()(attn, x, text)
    edited = proc(attn, x, text)
    assert torch.allclose(edited[:2], plain[:2], atol=1e-6)  # unconditional pass untouched
    assert not torch.allclose(edited[2:], plain[2:], atol=1e-3)
    # a box over the whole frame, no amplification, only the subject's words suppressed: plain attention
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    noop = boxes.BoxAttnProcessor(boxes.BoxAttention(ctx, {0: [1]}, words=[1, 2], strength=0.0,
                                                     suppress="subject_words"))
    assert torch.allclose(noop(attn, x, text), plain, atol=1e-6)


def _plain(tiny_shot):
    s = shotlib.from_container(shotlib.to_dict(tiny_shot))
    s.subjects = []
    return s


def test_box_control_changes_the_render_and_is_removed_after(model_shot, manager):
    tiny_shot = model_shot
    plain = _plain(tiny_shot)
    before = engine.render(plain, manager).frames
    pipe = manager.get(engine.prepare(plain)[1])
    denoiser = families.denoiser(pipe)
    procs = dict(denoiser.attn_processors)
    hooks = (dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks))
    r = engine.render(tiny_shot, manager)  # the example's red circle with a left-to-right track
    assert r.info["controls"] == ["boxes"]
    assert changed(before, r.frames, tiny_shot.model)
    assert dict(denoiser.attn_processors) == procs  # the very same processor objects
    assert (dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks)) == hooks
    assert np.array_equal(engine.render(plain, manager).frames, before)  # the cached pipeline is clean
    if tiny_shot.model == "tiny-wan":  # recorded: how 9 frames' boxes became 3 latent frames' boxes
        assert r.info["latent_boxes"] == {"rule": "union", "frames": [[0], [1, 2, 3, 4], [5, 6, 7, 8]]}


@pytest.mark.parametrize("model, words", [("tiny", 80), ("tiny-wan", 520)])  # 77 CLIP tokens, 512 UMT5 tokens
def test_phrase_lost_to_truncation_is_a_shot_error(manager, model, words):
    long_prompt = "a " + "very " * words + "red circle"
    s = shotlib.from_container({"model": model, "prompt": long_prompt, "steps": 2,
                                "subjects": [{"phrase": "red circle", "boxes": {0: [0, 0, 0.5, 0.5]}}]})
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.phrase"):
        engine.render(s, manager)


def test_more_subjects_than_the_limit_is_refused(tiny_shot):
    tiny_shot.prompt = "a red circle and a red circle and a red circle and a red circle and a red circle"
    tiny_shot.subjects = [shotlib.Subject(phrase="red circle") for _ in range(shotlib.MAX_SUBJECTS + 1)]
    with pytest.raises(shotlib.ShotError, match=rf"subjects: at most {shotlib.MAX_SUBJECTS} subjects"):
        engine.prepare(tiny_shot)


@pytest.mark.parametrize("field, value, message", [
    ("strength", -1.0, "box_control.strength"), ("amplify_steps", 99, "box_control.amplify_steps"),
    ("suppress", "everything", "box_control.suppress"), ("interpolation", "cubic", "box_control.interpolation")])
def test_box_settings_are_validated(tiny_shot, field, value, message):
    setattr(tiny_shot.box_control, field, value)
    with pytest.raises(shotlib.ShotError, match=message):
        engine.prepare(tiny_shot)


def test_a_model_without_spatial_cross_attention_refuses_boxes(model_shot, manager, monkeypatch):
    family = type(families.get(engine.prepare(model_shot)[1].family))
    monkeypatch.setattr(family, "cross_attention_names", lambda self, unet: [])  # where compose asks
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.boxes: .*no spatial cross-attention"):
        engine.render(model_shot, manager)


def test_interpolation_setting_reaches_the_render_context(tiny_shot):
    from studio.controls import compose

    shot = engine.prepare(tiny_shot)[0]
    linear = compose.context(shot, 8, 8).boxes[0]
    shot.box_control.interpolation = "smooth"
    smooth = compose.context(shot, 8, 8).boxes[0]
    assert torch.allclose(linear[[0, 7]], smooth[[0, 7]]) and smooth[1, 0] < linear[1, 0]


# --- Wan: tokens by offsets, boxes per latent frame, the attn2 processor -----------------------------------------


def test_wan_phrase_tokens_are_found_by_offsets_with_every_piece():
    from studio.controls import wan_attention as wa
    from studio.families import wan_build

    tok = wan_build.build_tokenizer()
    prompt = "a red zebracorn   and a Red circle on grass"  # the pipeline collapses the spaces before encoding
    pieces = tok.convert_ids_to_tokens(tok(wa.wan_prompt(prompt)).input_ids)
    got = wa.phrase_tokens(tok, prompt, {0: "red zebracorn", 1: "red circle"})
    assert [pieces[j] for j in got[0]] == ["▁red", "▁z", "e", "b", "r", "a", "c", "o", "r", "n"]  # 1 + 9 pieces
    assert "".join(pieces[j] for j in got[1]).replace("▁", "") in ("<unk>edcircle", "Redcircle")  # any case
    assert wa.word_tokens(tok, prompt) == list(range(len(pieces) - 1))  # every piece but </s> (no BOS, pads later)
    with pytest.raises(shotlib.ShotError, match=r"subjects\[1\]\.phrase: the phrase is not among the prompt's first "
                                                r"8 tokens"):
        wa.phrase_tokens(tok, prompt, {0: "red zebracorn", 1: "red circle"}, max_length=8)
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.phrase: .*not in the prompt"):
        wa.phrase_tokens(tok, prompt, {0: "blue star"})


def test_each_latent_frame_takes_the_union_of_its_frames_boxes():
    ctx = Context(frames=9, latent_h=4, latent_w=4, steps=4, do_cfg=True, generator=torch.Generator(),
                  latent_frames=3, temporal=4)
    ctx.boxes[0] = torch.from_numpy(boxes.interpolate({0: [0.0, 0.0, 0.25, 0.25], 8: [0.75, 0.75, 1.0, 1.0]}, 9))
    assert ctx.frame_groups() == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert ctx.latent_of_frame().tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    m = ctx.box_masks(0, 4, 4)  # (F', 16)
    per_frame = boxes.box_masks(ctx.boxes[0], 4, 4)
    assert m.shape == (3, 16) and torch.equal(m[0], per_frame[0])
    assert torch.equal(m[1], per_frame[1:5].any(0)) and torch.equal(m[2], per_frame[5:9].any(0))
    assert m[2].sum() > per_frame[8].sum()  # more than the last frame's box alone: the box moved during the latent
    one = Context(frames=9, latent_h=4, latent_w=4, steps=4, do_cfg=True, generator=torch.Generator())
    one.boxes = ctx.boxes
    assert torch.equal(one.box_masks(0, 4, 4), per_frame)  # one latent per frame (UNets): the frame's own box


@pytest.fixture(scope="module")
def wan_transformer():
    from studio.families import wan_build

    return wan_build.build_pipeline().transformer


def _wan_ctx(cond=True):
    ctx = Context(frames=9, latent_h=8, latent_w=8, steps=4, do_cfg=True, generator=torch.Generator(),
                  latent_frames=3, cfg_batched=False, temporal=4)
    ctx.cond_call = cond
    return ctx


def test_wan_zero_bias_is_the_stock_output_and_only_the_conditional_call_is_edited(wan_transformer):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from studio.controls.wan_attention import WanBoxAttention

    attn = wan_transformer.blocks[0].attn2
    torch.manual_seed(0)
    x, text = torch.randn(1, 3 * 16, 24), torch.randn(1, 512, 24)  # (B, F'·h2·w2, D), 512 text states
    stock = WanAttnProcessor()(attn, x, text)
    ctx = _wan_ctx()
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 9)  # everywhere, no amplification: a zero bias
    zero = WanBoxAttention(ctx, {0: [1, 2]}, [0, 1, 2, 3], strength=0.0, suppress="subject_words")
    proc = zero.processors(wan_transformer)["blocks.0.attn2.processor"]
    assert torch.allclose(proc(attn, x, text), stock, atol=1e-6)
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 9)
    ctl = WanBoxAttention(ctx, {0: [1, 2]}, [0, 1, 2, 3], strength=10.0, amplify_steps=2)
    proc = ctl.processors(wan_transformer)["blocks.0.attn2.processor"]
    edited = proc(attn, x, text)
    assert (edited - stock).abs().max() > 0.1
    # the bias: amplify inside the latent frame's box, NEG outside, only the phrase's and the words' columns
    mask = ctl.call_mask(x.shape[1] + 16, 512, torch.float32, "cpu")[0, 0]  # one appended reference frame
    assert (mask[:, 4:] == 0).all() and (mask[48:] == 0).all()  # pads and </s> untouched; reference rows too
    assert mask[0, 1] == pytest.approx(10.0 * (1 - 4 / 16)) and mask[15, 1] == boxes.NEG
    ctx.cond_call = False
    assert torch.equal(proc(attn, x, text), stock)  # the unconditional call: the layer's own processor
