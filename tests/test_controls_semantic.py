"""The controls do what they say on the shipped toy-world model, whose subjects' colours are known.

The measurements live in studio.toyworld.evaluate (`studio toyworld eval --controls` prints them); the thresholds
here come from those measurements on the shipped model (numbers in comments, same seeds) with margin.
"""

import numpy as np
import pytest

from studio.toyworld import evaluate


def test_box_track_puts_the_subject_inside_its_box(manager):
    # measured: with the track hit rate 1.00, IoU 0.87; without it 0.64, 0.31 (8 seeds)
    m = evaluate.measure_box_control(manager)
    assert m["with"]["hit_rate"] >= 0.85 and m["with"]["hit_rate"] >= m["without"]["hit_rate"] + 0.1, m
    assert m["with"]["iou"] >= 0.6 and m["with"]["iou"] >= m["without"]["iou"] + 0.2, m


def test_two_subjects_follow_their_own_tracks(manager):
    # measured: hit rates red square 1.00, yellow star 1.00 (6 seeds); their tracks cross, so a subject that
    # ignored its own track would be in the wrong half for most frames
    m = evaluate.measure_two_subjects(manager)
    assert min(m.values()) >= 0.75, m


# The held-out pans of benchmarks/pan_hold.py (--set holdout): never used to tune the pan. Each (prompt, seed) is
# also rendered without a pan, for the blob count.
HOLDOUT_PANS = [(p, 100 + 10 * i + d // 2, cx, cy) for i, p in enumerate(("a yellow circle on sand", "a red square on grass"))
                for d, (cx, cy) in enumerate(((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5)))]


@pytest.fixture(scope="module")
def pans(manager):
    """{(prompt, seed, cx, cy): render} of the held-out pans with the shot defaults, and their unpanned shots."""
    from studio import engine, shot as shotlib

    out = {}
    for prompt, seed, cx, cy in HOLDOUT_PANS:
        for key, cam in (((prompt, seed, cx, cy), {"cx": cx, "cy": cy}), ((prompt, seed, 0.0, 0.0), {})):
            if key not in out:
                out[key] = engine.render(shotlib.from_container({"model": "toyworld", "prompt": prompt, "seed": seed,
                                                                 "camera": cam}), manager)
    return out


@pytest.mark.parametrize("prompt, seed, cx, cy", HOLDOUT_PANS)
def test_camera_pan_holds_in_every_render(pans, prompt, seed, cx, cy):
    # Per render, the background (subjects left out) moves against the camera by at least half the request, along
    # the requested axis, as the render's own sidecar measure says. Measured on these 8 (benchmarks/pan_hold.py
    # --set holdout): before issue 22 (MotionBooth's shift alone) 0 of 8 took, mean ratio -0.16, 3 of 8 the wrong
    # way; with the defaults (rho 0.9, fresh fill, steps 2..7 of 20) 8 of 8, ratios 0.89..1.05 (README table).
    m = pans[(prompt, seed, cx, cy)].measures["camera"]
    assert m["ratio"] >= 0.5 and m["took"], m
    want, got = np.array(m["requested"]), np.array(m["achieved"])
    axis = 0 if cx else 1
    assert np.sign(got[axis]) == np.sign(want[axis]), m  # content moves against the camera
    assert abs(got[1 - axis]) < 0.5 * abs(want[axis]), m  # and mostly along the requested axis


def test_camera_pan_adds_no_subject_blobs(pans):
    # Connected regions of the subject's colour per frame, panned vs the same shot unpanned (8 pans, 4 unpanned).
    # Measured (regions of at least H*W/64 px): before issue 22 1.05 vs 1.00; with the defaults 1.02 vs 1.00.
    from studio import measures
    from studio.metrics import subject_colour

    panned = [measures.blobs(pans[(p, s, cx, cy)].frames, subject_colour(p)).mean() for p, s, cx, cy in HOLDOUT_PANS]
    plain = [measures.blobs(pans[(p, s, 0.0, 0.0)].frames, subject_colour(p)).mean() for p, s, _, _ in HOLDOUT_PANS]
    assert np.mean(panned) <= np.mean(plain) + 0.05, (panned, plain)


def test_reference_pulls_the_subject_toward_its_colour(manager, tmp_path):
    # The prompt names no colour; a purple-circle reference on "circle" at strength 1 (6 seeds): purple pixels
    # 1.34% without -> 10.9% with, 98% of the subject's pixels purple (51% without). What carries the colour is the
    # unconditional videos reading a blank reference (VideoMaker's zeros_like(z_ref)): guidance then pushes toward
    # the reference; with `unconditional: plain` (reference-only's convention) purple stayed at 2.4%. The reference
    # pooled to 16 keys a layer (the default key budget) carries it better than 64 keys did (6.0%, 84%).
    m = evaluate.measure_reference(manager, evaluate.reference_image(tmp_path / "purple.png"), strength=1.0)
    purple, without = m["with"]["purple"], m["without"]["purple"]
    assert purple >= 0.07 and purple >= 4 * without, m
    assert purple >= 0.8 * m["with"]["subject"], m


def test_reference_brings_its_subject_into_the_phrase(manager, tmp_path):
    # The prompt names no colour, and the model then barely draws a subject (1.8% subject-coloured pixels); a
    # reference on "circle" at strength 10 brings one in (18.5%), but red: at high strength the reference's layout
    # carries over and its colour does not (purple 1.3% -> 0.0%); strength 1 carries the colour (test above).
    m = evaluate.measure_reference(manager, evaluate.reference_image(tmp_path / "purple.png"))
    assert m["with"]["subject"] >= 0.08 and m["with"]["subject"] >= 4 * m["without"]["subject"], m
