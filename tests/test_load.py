"""A small version of the load test (benchmarks/load_test.py): the app served in-process, 3 gradio_client clients
rendering at once on the embedded toy-world model; every render is completed, refused by the queue's cap, or lost,
and none may be lost. The full run (8 clients x 3 renders and two browser sessions) is the benchmark's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import load_test  # noqa: E402


def test_three_concurrent_clients_are_all_served_and_none_is_lost(manager):
    report = load_test.run(clients=3, renders=1, steps=4, browsers=0, manager=manager, log=lambda *a: None)
    s = report.summary()
    assert s["lost"] == 0, s["lost_notes"]
    assert s["completed"] == 3 and s["refused"] == 0  # no cap: the queue takes them all, one render at a time
    assert s["render_s"]["n"] == s["queue_wait_s"]["n"] == s["service_s"]["n"] == 3
    assert 0 < s["render_s"]["median"] <= s["service_s"]["max"] and s["queue_wait_s"]["median"] >= 0
    assert s["memory"]["peak_during_load_mb"] >= s["memory"]["rss_before_load_mb"] > 100
    assert report.ok


def test_answers_of_a_full_queue_count_as_refused_not_lost(manager):
    report = load_test.run(clients=2, renders=1, steps=4, browsers=0, queue_size=0, manager=manager,
                           log=lambda *a: None, warm=False)
    s = report.summary()
    assert (s["completed"], s["refused"], s["lost"]) == (0, 2, 0), s
    assert all("queue is full" in o.note.lower() for o in report.outcomes)
