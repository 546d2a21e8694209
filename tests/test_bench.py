"""`studio bench`: one command, a table and JSON with every field, on the tiny model (numbers: README)."""

import json

import pytest

from studio import bench


def test_paired_ratios_are_per_round_medians_with_quartiles():
    r = bench.paired([2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 2.0, 2.0, 5.0, 4.0])  # ratios 2, 1.5, 2, 2, 1.5
    assert r == {"median": 2.0, "q1": 1.5, "q3": 2.0}
    assert bench.paired([3.0], [2.0]) == {"median": 1.5, "q1": 1.5, "q3": 1.5}


def test_peak_memory_sees_an_allocation_during_the_block():
    import numpy as np

    with bench.PeakMemory("cpu") as before:
        pass
    with bench.PeakMemory("cpu") as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block[::512] += 1
        del block
    assert mem.kind == "cpu_rss" and mem.peak > before.peak + 40 * 2**20


@pytest.fixture
def studio_cli(capsys, monkeypatch):
    """`studio ARGS` in this process: (exit status, stdout, stderr); torch's thread count restored after."""
    import torch

    from studio import cli

    threads = torch.get_num_threads()
    monkeypatch.setattr(bench, "SETUP_ROUNDS", 1)

    def run(*argv):
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    torch.set_num_threads(threads)


def test_bench_json_has_every_field_on_the_tiny_model(tmp_path, studio_cli):
    out = tmp_path / "bench.json"
    code, stdout, stderr = studio_cli("bench", "--model", "tiny", "--rounds", "2", "--warmup", "0", "--tune-steps",
                                      "2", "--set", "steps=3", "--set", "frames=8", "--cases", "controls,refine",
                                      "--json", str(out))
    assert code == 0, stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(bench.RESULT_FIELDS) <= set(res)
    assert res["model"]["preset"] == "tiny" and res["shot"]["steps"] == 3 and res["shot"]["frames"] == 8
    assert res["device"] == "cpu" and res["clock"] == "cpu" and res["threads"] == 1 and res["rounds"] == 2
    assert list(res["cases"]) == ["plain", "all controls", "boxes", "camera", "references", "noise prior", "face",
                                  "tiled", "face+tiled"]
    for name, case in res["cases"].items():
        assert set(bench.CASE_FIELDS) <= set(case), name
        assert case["render_s"] > 0 and len(case["render_s_rounds"]) == 2 and case["step_s"] > 0
        assert case["peak_memory_bytes"] > 50 * 2**20 and case["memory"] == "cpu_rss"
        assert (case["ratio"] is None) == (name == "plain")
    assert res["cases"]["all controls"]["controls"] == ["boxes", "camera", "reference"]
    assert res["cases"]["face"]["baseline"] == "boxes" and res["cases"]["camera"]["baseline"] == "plain"
    for method in ("lora", "tokens"):
        t = res["tuning"][method]
        assert t["steps"] == 2 and 0 < t["step_s"] <= t["total_s"] and t["peak_memory_bytes"] > 0
    assert 0 < res["tuning"]["setup"]["warm_s"] < res["tuning"]["setup"]["cold_s"]
    assert res["conditions"]["cpu_count"] >= 1 and "torch" in res["versions"]
    assert "all controls" in stdout and "ratio to baseline" in stdout and "s/step" in stdout
    # the bench's subjects are gone from the library afterwards
    from studio.subjects.library import SubjectLibrary

    assert not [n for n in SubjectLibrary().names() if n.startswith("bench-")]


@pytest.mark.parametrize("argv, want", [
    (["--cases", "plain,nosuch"], "--cases: unknown case 'nosuch'"),
    (["--width-factor", "0.5"], "--width-factor: only applies with --random-weights"),
    (["--model", "toyworld", "--random-weights"], "--random-weights: no published configs"),
    (["--model", "animatediff-sd15", "--random-weights", "--width-factor", "0.3"],
     "--width-factor: breaks the layout: text_encoder.hidden_size"),
])
def test_bad_bench_input_is_one_line(argv, want, studio_cli):
    code, _, stderr = studio_cli("bench", *argv)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("studio: error: ") and want in lines[0]
