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


@pytest.mark.parametrize("cx, cy, axis, sign", [(0.5, 0.0, 0, -1), (-0.5, 0.0, 0, 1), (0.0, 0.5, 1, -1),
                                                (0.0, -0.5, 1, 1)])
def test_camera_pan_moves_the_background_against_the_camera(manager, cx, cy, axis, sign):
    # measured content motion (px/frame): cx=0.5 -1.57, cx=-0.5 +1.32, cy=0.5 -1.25, cy=-0.5 +1.00;
    # 2.29 px/frame requested (half of 32 px over 7 frames)
    motion = evaluate.measure_camera(manager, cx, cy)
    assert sign * motion[axis] >= 0.7, motion
    assert abs(motion[1 - axis]) < abs(motion[axis]), motion


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
