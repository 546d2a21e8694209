"""Random weights of the real presets' layouts: the published configs, the width factor, the CLIP BPE tokenizer, the
cache, the flags and their refusals (the renders on these layouts are in test_real_layouts.py)."""

import json

import pytest
import torch

from studio import random_weights as rw
from studio.presets import load_model_preset, with_random_weights
from studio.shot import ShotError

LAYOUTS = ("animatediff-sd15", "zeroscope")


def _model(lib: str, cls_name: str, config: dict, device: str = "meta"):
    """A component model built from a config on the meta device (no memory, no init): its structure only."""
    import importlib

    cls = getattr(importlib.import_module(lib), cls_name)
    with torch.device(device):
        if lib == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict({k: v for k, v in config.items() if k != "architectures"}))


def _components(layout: str):
    """(name, library, class, config) of every model component of a layout (schedulers and tokenizers left out)."""
    for ref, repo in rw.repos(layout).items():
        for comp, (lib, cls_name) in rw.repo_components(repo).items():
            path = rw._config_file(repo / comp)
            if path is not None and path.name == "config.json":
                yield comp or ref, lib, cls_name, json.loads(path.read_text())


def _heads(model) -> dict:
    """{module name: attention heads} (diffusers' Attention.heads, transformers' num_heads)."""
    out = {}
    for n, m in model.named_modules():
        h = getattr(m, "heads", getattr(m, "num_heads", None))
        if isinstance(h, int) and not isinstance(h, bool):
            out[n] = h
    return out


# --- the published numbers ------------------------------------------------------------------------------------


def test_full_width_configs_have_the_published_sizes():
    """At full width the configs build the published models: SD 1.5's UNet has 859,520,964 parameters, its VAE
    83,653,863, CLIP ViT-L/14's text tower 123,060,480; Zeroscope's (ModelScope's) UNet3D 1.41 B (the "1.7b" with
    its 340 M OpenCLIP-H text encoder of 23 layers); the v1-5-3 motion adapter has no mid block."""
    sizes = {}
    for layout in LAYOUTS:
        for name, lib, cls_name, config in _components(layout):
            model = _model(lib, cls_name, config)
            sizes[layout, name] = sum(p.numel() for p in model.parameters())
            if cls_name == "MotionAdapter":
                assert model.mid_block is None and len(model.down_blocks) == 4
    assert sizes["animatediff-sd15", "unet"] == 859_520_964
    assert sizes["animatediff-sd15", "vae"] == sizes["zeroscope", "vae"] == 83_653_863
    assert sizes["animatediff-sd15", "text_encoder"] == 123_060_480
    assert round(sizes["zeroscope", "unet"] / 1e9, 2) == 1.41
    assert round(sizes["zeroscope", "text_encoder"] / 1e6) == 340


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_narrower_model_has_the_same_layout(layout):
    """Width 1/8: the same modules, the same attention heads in every layer (8 on SD 1.5, 5/10/20 on the UNet3D),
    the same depths; each dimension either kept (kernels, vocabulary, positions, latent channels) or × 1/8."""
    w = 0.125
    for name, lib, cls_name, config in _components(layout):
        full, narrow = _model(lib, cls_name, config), _model(lib, cls_name, rw.narrow(config, cls_name, w, name))
        a, b = dict(full.named_parameters()), dict(narrow.named_parameters())
        assert a.keys() == b.keys(), name
        for key in a:
            assert all(d2 in (d1, d1 * w) for d1, d2 in zip(a[key].shape, b[key].shape)), (name, key)
        heads = _heads(full)
        assert heads and heads == _heads(narrow), name
        if cls_name == "UNet2DConditionModel":
            assert set(heads.values()) == {8}
        if cls_name == "UNet3DConditionModel":  # spatial and temporal attention: channels / 64 heads; transformer_in 8
            spatial = {h for n, h in heads.items() if ".attentions." in n}
            assert spatial == {5, 10, 20} and heads["transformer_in.transformer_blocks.0.attn1"] == 8


def test_width_rules_narrow_heads_and_groups_consistently():
    unet = json.loads((rw.layout_dir("animatediff-sd15") / "unet/config.json").read_text())
    n = rw.narrow(unet, "UNet2DConditionModel", 0.125, "unet")
    assert n["block_out_channels"] == [40, 80, 160, 160] and n["attention_head_dim"] == 8  # 8 heads of 5/10/20
    assert n["norm_num_groups"] == 4 and n["cross_attention_dim"] == 96
    z = json.loads((rw.layout_dir("zeroscope") / "unet/config.json").read_text())
    nz = rw.narrow(z, "UNet3DConditionModel", 0.25, "unet")
    assert nz["attention_head_dim"] == 16 and nz["block_out_channels"] == [80, 160, 320, 320]  # still 5/10/20 heads
    assert rw.narrow(unet, "UNet2DConditionModel", 1.0, "unet") == unet


@pytest.mark.parametrize("factor, field", [(0.3, "text_encoder.hidden_size 768 × 0.3 = 230.4"),
                                           (0.1, "text_encoder.hidden_size 768 × 0.1 = 76.8"),
                                           (0.0625, "unet.attention_head_dim 8 does not divide "
                                                    "unet.block_out_channels 20")])  # 8 heads, 20 channels
def test_a_factor_that_breaks_the_layout_is_one_line_naming_the_field(factor, field):
    preset = load_model_preset("animatediff-sd15")
    with pytest.raises(ShotError) as e:
        with_random_weights(preset, factor)
    msg = str(e.value)
    assert msg.startswith("--width-factor: breaks the layout: ") and field in msg and "\n" not in msg


def test_bad_factors_and_presets_without_configs_are_refused():
    for bad in (0, -0.5, 1.5, True, "half"):
        with pytest.raises(ShotError, match=r"--width-factor: must be a number in \(0, 1\]"):
            with_random_weights(load_model_preset("zeroscope"), bad)
    with pytest.raises(ShotError, match=r"^--random-weights: no published configs .*animatediff-sd15, .*zeroscope.*"
                                        r"\(got 'toyworld'\)"):
        with_random_weights(load_model_preset("toyworld"))


def test_preset_files_take_random_weights_and_refuse_a_width_without_them(tmp_path):
    good = tmp_path / "sd-narrow.yaml"
    good.write_text("name: animatediff-sd15\nfamily: animatediff\nbase: stable-diffusion-v1-5/stable-diffusion-v1-5\n"
                    "motion_adapter: guoyww/animatediff-motion-adapter-v1-5-3\nrandom_weights: true\n"
                    "width_factor: 0.25\n")
    p = load_model_preset(str(good))
    assert p.random_weights and p.width_factor == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("width_factor: 0.25", "width_factor: 0.3"))
    with pytest.raises(ShotError, match=r"^width_factor: breaks the layout: text_encoder.hidden_size"):
        load_model_preset(str(bad))
    alone = tmp_path / "alone.yaml"
    alone.write_text(good.read_text().replace("random_weights: true\n", ""))
    with pytest.raises(ShotError, match="width_factor 0.25 only applies with random_weights: true"):
        load_model_preset(str(alone))
    other = tmp_path / "other.yaml"  # a layout named explicitly: one without the motion adapter the preset loads
    other.write_text(good.read_text().replace("random_weights: true\n", "random_weights: true\nlayout: zeroscope\n"))
    with pytest.raises(ShotError, match="random_weights: .*layout 'zeroscope' have no motion_adapter/"):
        load_model_preset(str(other))


# --- CLIP's BPE -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    for f in (rw.layout_dir("animatediff-sd15") / "tokenizer").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    rw.write_clip_bpe(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def test_the_shipped_bpe_gives_sd15s_token_ids(clip_tokenizer):
    tok = clip_tokenizer
    assert len(tok) == 49408 == json.loads((rw.layout_dir("zeroscope") / "text_encoder/config.json")
                                          .read_text())["vocab_size"]
    assert tok("a photograph of an astronaut riding a horse").input_ids == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert tok.tokenize("a Shiba Inu") == ["a</w>", "shi", "ba</w>", "in", "u</w>"]  # lower case, multi-piece
    assert tok.tokenize("capybara") == ["cap", "y", "bara</w>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)


def test_a_phrase_matches_whole_words_only_not_the_last_piece_of_a_longer_word(clip_tokenizer):
    """With BPE, "bara" is also the last piece of "capybara": box control must take the word "bara", not the piece."""
    from studio.controls.boxes import assign_phrases, phrase_occurrences

    tok = clip_tokenizer
    prompt = "a capybara and a bara on a beach"  # BOS a cap y bara and a bara ...
    assert phrase_occurrences(tok, prompt, "bara") == [[7]]
    assert phrase_occurrences(tok, prompt, "capybara") == [[2, 3, 4]]
    assert assign_phrases(tok, "a snowboarder next to a boarder", {0: "boarder"}) == {0: [7]}  # not snow+boarder
    assert assign_phrases(tok, "a Shiba Inu, then a shiba inu", {0: "shiba inu", 1: "shiba inu"}) == {
        0: [2, 3, 4, 5], 1: [9, 10, 11, 12]}


# --- building, caching, the cache key -------------------------------------------------------------------------


def test_builds_are_seeded_cached_and_leave_the_global_rng_alone(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from studio import pipelines

    folders = []
    for home in ("a", "b"):
        monkeypatch.setenv("SHOT_STUDIO_HOME", str(tmp_path / home))
        before = torch.get_rng_state()
        folders.append(rw.build_folder("zeroscope", 0.0625))
        assert torch.equal(torch.get_rng_state(), before)
    a, b = (load_file(str(f / "base/unet/diffusion_pytorch_model.safetensors")) for f in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((folders[0] / "base/model_index.json").read_text())["_class_name"] == "TextToVideoSDPipeline"
    stamp = (folders[1] / "complete").stat().st_mtime_ns
    assert rw.build_folder("zeroscope", 0.0625) == folders[1] and (folders[1] / "complete").stat().st_mtime_ns == stamp
    assert rw.build_folder("zeroscope", 0.0625, seed=1) != folders[1]
    real = load_model_preset("zeroscope")
    keys = {pipelines.key_for(p, "cpu") for p in (real, with_random_weights(real, 0.0625),
                                                   with_random_weights(real, 0.125), with_random_weights(real))}
    assert len(keys) == 4  # random weights and every width factor get pipelines of their own


def test_sd15_folder_holds_both_repos_and_leaves_out_what_animatediff_does_not_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOT_STUDIO_HOME", str(tmp_path))
    folder = rw.build_folder("animatediff-sd15", 0.0625 * 2)
    index = json.loads((folder / "base/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "safety_checker" not in index
    components = sorted(k for k in index if not k.startswith("_"))
    assert components == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert json.loads((folder / "motion_adapter/config.json").read_text())["motion_num_attention_heads"] == 8
    assert (folder / "base/tokenizer/vocab.json").is_file() and (folder / "base/tokenizer/merges.txt").is_file()


@pytest.mark.parametrize("argv, want", [
    (["--random-weights"], "studio: error: --random-weights: no published configs for this model"),
    (["--random-weights", "--width-factor", "0.3", "--set", "model=zeroscope"],
     "studio: error: --width-factor: breaks the layout: text_encoder.hidden_size 1024 × 0.3 = 307.2"),
    (["--width-factor", "0.5"], "studio: error: --width-factor: only applies with --random-weights (got 0.5)"),
])
def test_render_flags_refuse_bad_input_in_one_line_before_anything_loads(tmp_path, capsys, argv, want):
    from studio import cli

    shot = tmp_path / "shot.yaml"
    shot.write_text("model: toyworld\nprompt: a red circle on grass\n")
    assert cli.main(["render", str(shot), "--out", str(tmp_path / "x.mp4"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want) and not (tmp_path / "x.mp4").exists()
