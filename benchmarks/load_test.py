"""Load test: the studio's app under concurrent renders from gradio_client clients and browser sessions.

    python benchmarks/load_test.py [--clients 8] [--renders 3] [--steps 20] [--browsers 2] [--queue-size N]
                                   [--threads N] [--json out.json]

Starts the app in this process as `studio ui` does (one queue slot for renders and training, the studio's thread
choice), on the embedded toy-world model, and warms it with one render. Then `--clients` gradio_client clients, each
in a thread of its own, send `--renders` renders each, one after another, of the page's opening shot (seed per
render). Meanwhile (`--browsers 2`, needs Playwright and Chromium as tests/test_browser.py does) two browser
sessions open the page and press Render: session A presses Cancel once its render is denoising, session B lets its
render finish. Reported:

- completed / refused (the queue's cap: Gradio's queue(max_size), `--queue-size`; "queue is full" answers) / lost
  (anything else: an error, a wrong result, no answer within --timeout). The exit status is 1 when any is lost or the
  cancel check fails;
- queue wait (submit -> the job starts processing, from the job's status updates), service time (processing ->
  result) and the engine's render time (the sidecar's timings.total): median, p90, max;
- peak memory of the process (the app; the browsers are separate processes) over the whole run and during the load;
- whether Cancel in session A stopped only A's render: A shows "render cancelled" and no video, B's render and
  every client's render completed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import studio  # noqa: E402,F401  (first: the OpenMP wait policy before torch loads)

ROOT = Path(__file__).resolve().parent.parent
SHOT = ROOT / "presets" / "shots" / "toyworld-star.yaml"
CHROMIUM = os.environ.get("SHOT_STUDIO_CHROMIUM") or "/usr/bin/chromium"
REFUSED = re.compile(r"queue is full|queue.*(cap|limit)|too many|busy", re.IGNORECASE)


@dataclass
class Outcome:
    client: int
    render: int
    kind: str  # completed | refused | lost
    submitted: float
    queue_wait: float | None = None
    service: float | None = None
    render_s: float | None = None  # the engine's own time (sidecar timings.total)
    note: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    browsers: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return self.count("lost") == 0 and self.browsers.get("cancel_isolated", True)

    def summary(self) -> dict:
        done = [o for o in self.outcomes if o.kind == "completed"]
        return {"completed": self.count("completed"), "refused": self.count("refused"), "lost": self.count("lost"),
                "queue_wait_s": percentiles([o.queue_wait for o in done]),
                "service_s": percentiles([o.service for o in done]),
                "render_s": percentiles([o.render_s for o in done]),
                "memory": self.memory, "browsers": self.browsers, "settings": self.settings,
                "wall_s": round(self.wall_s, 1), "lost_notes": [o.note for o in self.outcomes if o.kind == "lost"]}


def percentiles(xs: list) -> dict:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {}
    at = lambda q: xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]  # noqa: E731 - nearest rank
    return {"n": len(xs), "median": round(statistics.median(xs), 2), "p90": round(at(0.9), 2),
            "max": round(xs[-1], 2)}


class MemoryWatch:
    """This process's resident memory, sampled every 0.2 s (peak) while running."""

    def __init__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(0.2)

    def __enter__(self):
        self.peak_mb = self.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_app(manager=None, queue_size: int | None = None, threads=None):
    """The app as `studio ui` serves it (studio.ui.app.launch), with Gradio's queue cap; (demo, url)."""
    import socket

    from studio import threads as threadlib
    from studio.ui import app as appmod, events as ev

    if threads is not None or threadlib.current() is None:
        threadlib.apply(threads)
    demo = appmod.build_app(manager)
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ev.output_dir())], max_file_size=appmod.MAX_UPLOAD)
    return demo, f"http://127.0.0.1:{port}/"


def form(steps: int, seed: int) -> dict:
    return dict(model="toyworld", prompt="a yellow star moving right on sky", negative_prompt="", seed=seed,
                steps=steps, guidance_scale=7.5, frames=8, width=32, height=32, gamma=0.2, cx=0.0, cy=0.0)


def client_run(url: str, client: int, renders: int, steps: int, timeout: float) -> list[Outcome]:
    """One gradio_client client sending its renders one after another."""
    import asyncio

    from gradio_client import Client
    from gradio_client.utils import Status

    from studio import export

    shot_yaml = SHOT.read_text()
    outcomes = []
    c = Client(url, verbose=False)
    for r in range(renders):
        t0 = time.time()
        o = Outcome(client, r, "lost", t0)
        try:
            job = c.submit(shot_yaml=shot_yaml, **form(steps, 1000 * client + r), api_name="/render")
            video, downloads, resolved, status, table = job.result(timeout=timeout)
            t_end = time.time()

            async def updates():
                return [u async for u in job if getattr(u, "code", None) is not None]

            started = [u.time.timestamp() for u in asyncio.run(updates())
                       if u.code in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING) and u.time]
            path = video["video"] if isinstance(video, dict) else video
            frames = export.probe_video(path)["frames"]
            sidecar = next(p for p in downloads if str(p).endswith(".json"))
            sidecar = sidecar["path"] if isinstance(sidecar, dict) else sidecar
            timings = json.loads(Path(sidecar).read_text())["timings"]
            if frames != 8 or "frames 32×32 on toyworld" not in status:
                o.note = f"client {client} render {r}: wrong result ({frames} frames; {status[:80]!r})"
            else:
                o.kind = "completed"
                start = min(started) if started else None
                o.queue_wait = (start - t0) if start else None
                o.service = (t_end - start) if start else None
                o.render_s = timings.get("total")
        except Exception as e:  # noqa: BLE001 - every failure is classified, none is raised
            text = f"{type(e).__name__}: {e}"
            if REFUSED.search(text):
                o.kind, o.note = "refused", text[:200]
            else:
                o.note = f"client {client} render {r}: {text[:300]}"
        outcomes.append(o)
    return outcomes


def browser_check(url: str, steps: int, timeout: float, log=print) -> dict:
    """Two browser sessions render; A cancels once its render is denoising. Did only A's render stop?"""
    from playwright.sync_api import sync_playwright

    def open_page(browser):
        page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
        page.goto(url)
        page.wait_for_selector("#canvas canvas", timeout=120_000)
        box = page.locator("input[type=number][aria-label='number input for steps']")
        box.fill(str(steps))
        box.press("Enter")
        return page

    def wait(predicate, seconds, what):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if predicate():
                return True
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")

    result = {"cancel_isolated": False}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            a, b = open_page(browser), open_page(browser)
            b.locator("#render").click()
            a.locator("#render").click()
            t0 = time.time()
            # A's render is running once the page shows its denoising progress; then A presses Cancel
            wait(lambda: a.get_by_text(re.compile(r"denoising")).count() > 0, timeout, "session A's render to start")
            a.locator("#cancel").click()
            log(f"  session A: cancel pressed {time.time() - t0:.1f} s after Render")
            wait(lambda: "render cancelled" in a.locator("#status").inner_text(), timeout, "A's render to stop")
            wait(lambda: "frames 32×32 on toyworld" in b.locator("#status").inner_text(), timeout,
                 "session B's render")
            a_video = a.locator("#video video")
            result.update(
                a_status=a.locator("#status").inner_text().strip(), b_status=b.locator("#status").inner_text().strip(),
                a_video=a_video.count() > 0 and bool(a_video.get_attribute("src")),
                b_video=bool(b.locator("#video video").get_attribute("src")))
            result["cancel_isolated"] = not result["a_video"] and result["b_video"]
        except Exception as e:  # noqa: BLE001 - reported, and the check fails
            result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            browser.close()
    return result


def run(clients: int = 8, renders: int = 3, steps: int = 20, browsers: int = 2, queue_size: int | None = None,
        threads=None, timeout: float = 1800.0, manager=None, log=print, warm: bool = True) -> Report:
    from studio import engine, threads as threadlib

    report = Report()
    with MemoryWatch() as whole:
        demo, url = start_app(manager, queue_size, threads)
        try:
            from studio import shot as shotlib

            if warm:  # the pipeline loaded before the clients come
                engine.render(shotlib.load(SHOT, [f"steps={steps}"]), manager)
            before_mb = MemoryWatch.rss_mb()
            log(f"app at {url}; {clients} clients x {renders} renders, {steps} steps, browsers {browsers}, "
                f"queue cap {queue_size}, torch threads {threadlib.current().describe()}")
            t0 = time.time()
            with MemoryWatch() as during, ThreadPoolExecutor(clients + 1) as pool:
                futures = [pool.submit(client_run, url, c, renders, steps, timeout) for c in range(clients)]
                if browsers:
                    time.sleep(1.0)  # the clients' first renders are queued first
                    report.browsers = browser_check(url, steps, timeout, log)
                for f in futures:
                    report.outcomes += f.result()
            report.wall_s = time.time() - t0
        finally:
            demo.close()
    report.memory = {"rss_before_load_mb": round(before_mb), "peak_during_load_mb": round(during.peak_mb),
                     "peak_whole_run_mb": round(max(whole.peak_mb, during.peak_mb))}
    choice = threadlib.current()
    report.settings = {"threads": choice.describe(), "wait_policy": threadlib.wait_policy(), "clients": clients,
                       "renders": renders, "steps": steps, "queue_size": queue_size, "cores": os.cpu_count(),
                       "load_average": [round(x, 2) for x in os.getloadavg()]}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--renders", type=int, default=3, help="renders per client, one after another")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--browsers", type=int, default=2, choices=[0, 2], help="2: the two-session cancel check")
    p.add_argument("--queue-size", type=int, help="Gradio's queue cap (default: none, as the app has)")
    p.add_argument("--threads", help="torch CPU threads (default: the studio's choice)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a render may take to come back")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.browsers and not Path(CHROMIUM).exists():
        p.error(f"no Chromium at {CHROMIUM} (.ci/browser-deps.sh installs it); or pass --browsers 0")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    report = run(args.clients, args.renders, args.steps, args.browsers, args.queue_size, args.threads, args.timeout)
    s = report.summary()
    print(f"\n{s['completed']} completed, {s['refused']} refused (queue cap), {s['lost']} lost, "
          f"in {s['wall_s']} s")
    for name in ("queue_wait_s", "service_s", "render_s"):
        print(f"  {name:13s} {s[name]}")
    print(f"  memory       {s['memory']}")
    if report.browsers:
        print(f"  browsers     {report.browsers}")
    print(f"  settings     {s['settings']}")
    for line in s["lost_notes"]:
        print(f"  LOST: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({**s, "outcomes": [o.__dict__ for o in report.outcomes]}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
