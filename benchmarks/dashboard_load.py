#!/usr/bin/env python
"""Dashboard load benchmark: many browser sessions against one `panel serve dashboard/app.py`.

For each N in --sessions (default 1, 4, 8), N headless-Chromium sessions open the page at
once and each uploads its own files: valid lesion JPEGs (drawn here, a different one per
session and file), a corrupt JPEG and a file over the upload limit. Then K sessions are
opened and closed one after another, each closed while the server is still analysing its
upload (the case that used to fill the server log with tracebacks).

Reported per N: upload-to-result latency (p50 / p95 / max over all files of all sessions,
from handing the files to the page to the file's card being shown), unexpected errors,
cross-session leaks, and the server's resident memory before and after. A leak is checked
by content: every session must show exactly its own file names, and each valid file's card
must show the class and confidence that the same model gives that image when run directly
here (`keras_ham.dashboard_logic.analyze_upload`). The server log is scanned for
tracebacks. Everything runs on the loopback address, every wait has a timeout, the number
of sessions and cycles is bounded, and the server is stopped at the end.

    python benchmarks/dashboard_load.py --model runs/demo/best.keras
    python benchmarks/dashboard_load.py --model M --sessions 1,4,8 --cycles 30 --out bench/out/dashboard_load.json

Needs Playwright (requirements-dev.txt) and Chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("KERAS_HAM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
#: Upper bounds that keep a run finite whatever the options say.
MAX_SESSIONS = 16
MAX_CYCLES = 100
#: Over the dashboard's 20 MB upload limit (the browser refuses it before sending).
OVERSIZED_BYTES = 21_000_000
#: Lines of a server log that mean something went wrong (a traceback or an unhandled task error).
LOG_PROBLEM = re.compile(r"^Traceback \(most recent call last\)|Task exception was never retrieved|"
                         r"Exception in callback|ERROR", re.MULTILINE)


class LoadBenchError(RuntimeError):
    """The benchmark could not run (no Chromium, the server did not start, ...)."""


# --------------------------------------------------------------------------- inputs


def lesion_jpeg_bytes(seed: int, size: tuple[int, int] = (600, 450)) -> bytes:
    """A drawn 600x450 lesion-like JPEG, different for every seed (position, size, colour, noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
    lesion = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))[..., None]
    skin = np.array([226, 182, 160.0]) + rng.normal(0, 10, 3)
    colour = rng.uniform(20, 160, 3)
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(skin * (1 - lesion) + colour * lesion + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


CORRUPT_JPEG = b"\xff\xd8\xff\xe0 this is not really a JPEG " * 20


@dataclasses.dataclass(frozen=True)
class UploadFile:
    """One file a session uploads and what its card must show."""

    path: Path
    kind: str  # valid | corrupt | oversized
    expected_class: str | None = None  # valid files: the class the model gives the image
    expected_confidence: str | None = None  # as the card prints it, e.g. "87.1 %"

    @property
    def name(self) -> str:
        return self.path.name


def percent_text(value: float) -> str:
    """The card's way of printing a probability (dashboard/app.py `_percent`)."""
    return f"{100 * value:.1f}\u00a0%"


def expected_predictions(model_path: Path, files: Sequence[tuple[Path, bytes]]) -> dict[str, tuple[str, str]]:
    """{file name: (class, confidence text)} from the dashboard's own analysis code, run here."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from keras_ham.device import configure_device

    configure_device("cpu", log=None)
    from keras_ham import dashboard_logic as logic

    bundle = logic.load_model_bundle(model_path)
    expected = {}
    for index, (path, data) in enumerate(files):
        card = logic.analyze_upload(path.name, data, bundle, card_id=index)
        if not isinstance(card, logic.ImageCard):
            raise LoadBenchError(f"{path.name}: the benchmark's own image could not be analysed: {card.message}")
        expected[path.name] = (card.predicted_name, percent_text(card.confidence))
    return expected


def make_session_files(model_path: Path, work_dir: Path, sessions: int, valid_per_session: int) -> list[list[UploadFile]]:
    """Per session: `valid_per_session` distinct valid JPEGs, one corrupt JPEG, one oversized file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    oversized = work_dir / "oversized.jpg"
    if not oversized.is_file() or oversized.stat().st_size != OVERSIZED_BYTES:
        oversized.write_bytes(b"\xff\xd8\xff" + np.random.default_rng(0).bytes(OVERSIZED_BYTES - 3))
    valid = []
    for session in range(sessions):
        for index in range(valid_per_session):
            path = work_dir / f"s{session:02d}_lesion{index}.jpg"
            data = lesion_jpeg_bytes(1000 * session + index)
            path.write_bytes(data)
            valid.append((path, data))
    expected = expected_predictions(model_path, valid)
    per_session = []
    for session in range(sessions):
        files = [UploadFile(path, "valid", *expected[path.name]) for path, _ in valid
                 if path.name.startswith(f"s{session:02d}_")]
        corrupt = work_dir / f"s{session:02d}_corrupt.jpg"
        corrupt.write_bytes(CORRUPT_JPEG)
        big = work_dir / f"s{session:02d}_oversized.jpg"
        with contextlib.suppress(FileNotFoundError):
            big.unlink()
        os.link(oversized, big)  # same bytes, its own name (the name is what the card shows)
        files += [UploadFile(corrupt, "corrupt"), UploadFile(big, "oversized")]
        per_session.append(files)
    return per_session


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def panel_server(model: Path, runs_dir: Path, log_path: Path, *, start_timeout: float = 180.0) -> Iterator[Server]:
    """`panel serve dashboard/app.py` on 127.0.0.1 (a free port), stopped on exit."""
    port = free_port()
    env = {**os.environ, "KERAS_HAM_RUNS": str(runs_dir), "KERAS_BACKEND": "torch", "PYTHONUNBUFFERED": "1"}
    env.pop("KERAS_TORCH_DEVICE", None)
    command = [sys.executable, "-m", "panel", "serve", "dashboard/app.py", "--port", str(port), "--address",
               "127.0.0.1", f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness", "--args", "--model", str(model)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/app", process, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise LoadBenchError(f"panel serve exited with {process.returncode}:\n{server.log_text()[-3000:]}")
            try:
                # /liveness answers once the server listens, without building a session
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise LoadBenchError(f"panel serve did not answer within {start_timeout:.0f} s:\n"
                                         f"{server.log_text()[-3000:]}") from None
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def log_problems(text: str) -> list[str]:
    """Each line of a server log that starts a traceback or reports an unhandled error, with
    the line after it (the exception) for context."""
    lines = text.splitlines()
    found = []
    for index, line in enumerate(lines):
        if LOG_PROBLEM.search(line):
            found.append(" | ".join(lines[index:index + 2]))
    return found


# --------------------------------------------------------------------------- sessions


@dataclasses.dataclass
class SessionResult:
    session: int
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)  # unexpected outcomes
    leaks: list[str] = dataclasses.field(default_factory=list)  # another session's content seen here


async def _open(context, url: str, timeout_ms: float):
    page = await context.new_page()
    page.set_default_timeout(timeout_ms)
    await page.goto(url, wait_until="domcontentloaded")
    await page.locator(".kh-upload input[type=file]").wait_for(state="attached")
    return page


async def _card_shown(page, upload: UploadFile) -> str | None:
    """Wait for `upload`'s card; return a problem in words, or None when it shows what it must."""
    if upload.kind == "valid":
        card = page.locator(".kh-card").filter(has=page.locator(f'b[title="{upload.name}"]'))
        await card.locator(".kh-gradcam img").wait_for(state="visible")
        shown_class = (await card.locator(".kh-prediction .kh-class").text_content() or "").strip()
        shown_confidence = (await card.locator(".kh-prediction .kh-badge").text_content() or "").strip()
        if shown_class != upload.expected_class or not shown_confidence.endswith(upload.expected_confidence):
            return (f"{upload.name}: card shows {shown_class} {shown_confidence!r}, the model gives "
                    f"{upload.expected_class} {upload.expected_confidence!r}")
        return None
    message = page.locator(".kh-error-card .kh-error-msg").filter(has_text=upload.name)
    await message.first.wait_for(state="visible")
    wanted = "upload limit" if upload.kind == "oversized" else "image"
    text = ""
    for _ in range(25):  # Panel can re-render the card between the wait and the read (seen once: '')
        text = (await message.first.inner_text()).strip()
        if wanted in text:
            return None
        await asyncio.sleep(0.2)
    return f"{upload.name}: unexpected message {text!r}"


async def run_session(browser, url: str, session: int, files: Sequence[UploadFile], all_names: set[str],
                      timeout_ms: float) -> SessionResult:
    """Open a page, upload `files` at once, wait for every card, check content and isolation."""
    result = SessionResult(session)
    context = await browser.new_context(viewport={"width": 1440, "height": 1100})
    try:
        page = await _open(context, url, timeout_ms)
        started = time.perf_counter()
        await page.locator(".kh-upload input[type=file]").set_input_files([str(f.path) for f in files])

        async def wait(upload: UploadFile) -> None:
            try:
                problem = await _card_shown(page, upload)
            except Exception as error:  # noqa: BLE001 - a timeout or a closed page is a result here
                problem = f"{upload.name}: no card ({type(error).__name__}: {str(error).splitlines()[0]})"
            result.latencies_s.append(time.perf_counter() - started)
            if problem:
                result.errors.append(problem)

        await asyncio.gather(*(wait(upload) for upload in files))
        own = {f.name for f in files}
        shown = set(await page.locator(".kh-card b[title]").evaluate_all("els => els.map(e => e.title)"))
        shown |= {name for name in all_names
                  if await page.locator(".kh-error-card .kh-error-msg").filter(has_text=name).count()}
        result.leaks += sorted(f"session {session} shows {name}" for name in shown - own)
        missing = own - shown
        result.errors += sorted(f"session {session}: no card for {name}" for name in missing
                                if not any(name in error for error in result.errors))
    except Exception as error:  # noqa: BLE001
        result.errors.append(f"session {session}: {type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        await context.close()
    return result


async def open_and_close(browser, url: str, image: Path, timeout_ms: float) -> str | None:
    """One session that uploads `image` and closes while the server is still analysing it."""
    context = await browser.new_context()
    try:
        page = await _open(context, url, timeout_ms)
        await page.locator(".kh-upload input[type=file]").set_input_files(str(image))
        await page.locator(".kh-pending, .kh-card").first.wait_for(state="attached")  # the server has it
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    finally:
        await context.close()  # mid-update: the tab goes away while the server writes to it


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 3),
            "p95": round(float(np.percentile(ordered, 95)), 3),
            "max": round(ordered[-1], 3)}


async def _run(options: argparse.Namespace, server: Server, files_by_session: list[list[UploadFile]]) -> dict:
    from playwright.async_api import async_playwright

    timeout_ms = options.timeout * 1000
    all_names = {f.name for files in files_by_session for f in files}
    rows = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # One warm-up session, so the model's load and torch's first call are not in the figures.
            warm = await run_session(browser, server.url, 0, files_by_session[0][:1], all_names, timeout_ms)
            if warm.errors:
                raise LoadBenchError(f"warm-up session failed: {warm.errors}")
            rss_start = server.rss_mb()
            for count in options.sessions:
                before = server.rss_mb()
                started = time.perf_counter()
                results = await asyncio.gather(*(
                    run_session(browser, server.url, index, files_by_session[index], all_names, timeout_ms)
                    for index in range(count)))
                wall = time.perf_counter() - started
                latencies = [value for result in results for value in result.latencies_s]
                rows.append({
                    "sessions": count,
                    "files": sum(len(files_by_session[i]) for i in range(count)),
                    "latency_s": _stats(latencies),
                    "wall_s": round(wall, 2),
                    "errors": [e for result in results for e in result.errors],
                    "leaks": [leak for result in results for leak in result.leaks],
                    "rss_before_mb": round(before, 1),
                    "rss_after_mb": round(server.rss_mb(), 1),
                })
                print(format_row(rows[-1]), flush=True)
            before_cycles = server.rss_mb()
            cycle_errors = []
            image = files_by_session[0][0].path
            started = time.perf_counter()
            for _ in range(options.cycles):
                problem = await open_and_close(browser, server.url, image, timeout_ms)
                if problem:
                    cycle_errors.append(problem)
            cycles_wall = time.perf_counter() - started
        finally:
            await browser.close()
    await asyncio.sleep(options.settle)  # let the server notice the closed sockets and clean up
    return {
        "rows": rows,
        "cycles": {"count": options.cycles, "wall_s": round(cycles_wall, 2), "errors": cycle_errors,
                   "rss_before_mb": round(before_cycles, 1), "rss_after_mb": round(server.rss_mb(), 1)},
        "rss_after_warmup_mb": round(rss_start, 1),
    }


def format_row(row: dict) -> str:
    latency = row["latency_s"]
    return (f"N={row['sessions']:<2} files={row['files']:<3} latency p50 {latency['p50']} s, p95 {latency['p95']} s, "
            f"max {latency['max']} s; errors {len(row['errors'])}, leaks {len(row['leaks'])}; "
            f"RSS {row['rss_before_mb']:.0f} -> {row['rss_after_mb']:.0f} MB")


def format_table(results: dict) -> str:
    lines = ["| sessions at once | files | upload-to-result p50 / p95 / max (s) | errors | leaks | server RSS before -> after (MB) |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        latency = row["latency_s"]
        lines.append(f"| {row['sessions']} | {row['files']} | {latency['p50']} / {latency['p95']} / {latency['max']} | "
                     f"{len(row['errors'])} | {len(row['leaks'])} | {row['rss_before_mb']:.0f} -> {row['rss_after_mb']:.0f} |")
    cycles = results["cycles"]
    lines.append(f"\n{cycles['count']} sessions opened and closed mid-upload in {cycles['wall_s']} s: "
                 f"{len(cycles['errors'])} errors; server RSS {cycles['rss_before_mb']:.0f} -> "
                 f"{cycles['rss_after_mb']:.0f} MB; server log problems: {len(results['log_problems'])}")
    return "\n".join(lines)


def run_load_benchmark(model: Path, *, sessions: Sequence[int] = (1, 4, 8), cycles: int = 30,
                       valid_per_session: int = 2, timeout: float = 180.0, settle: float = 3.0,
                       work_dir: Path | None = None) -> dict:
    """Start a server for `model`, run the sessions and cycles, stop it; the results as a dict."""
    if not CHROMIUM.is_file():
        raise LoadBenchError(f"{CHROMIUM} not found (Debian: apt-get install chromium).")
    sessions = sorted({min(int(n), MAX_SESSIONS) for n in sessions if int(n) >= 1})
    if not sessions:
        raise LoadBenchError("--sessions needs at least one count >= 1.")
    options = argparse.Namespace(sessions=sessions, cycles=min(max(cycles, 0), MAX_CYCLES), timeout=timeout,
                                 settle=settle)
    with tempfile.TemporaryDirectory(prefix="keras-ham-load-") as scratch:
        work = Path(work_dir or scratch)
        files = make_session_files(Path(model), work / "files", max(sessions), valid_per_session)
        runs_dir = work / "runs"
        runs_dir.mkdir(exist_ok=True)
        with panel_server(Path(model).resolve(), runs_dir, work / "panel.log") as server:
            results = asyncio.run(_run(options, server, files))
            log_text = server.log_text()
    from keras_ham.machine import cpu_model, load_average

    results.update(model=str(model), cpu=cpu_model(), logical_cores=os.cpu_count(), load_average_end=load_average(),
                   log_problems=log_problems(log_text), valid_files_per_session=valid_per_session)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the .keras model the server loads (e.g. runs/demo/best.keras)")
    parser.add_argument("--sessions", default="1,4,8",
                        help=f"comma-separated numbers of concurrent sessions (default 1,4,8; at most {MAX_SESSIONS})")
    parser.add_argument("--cycles", type=int, default=30,
                        help=f"sessions opened and closed one after another (default 30; at most {MAX_CYCLES})")
    parser.add_argument("--valid-per-session", type=int, default=2, help="valid JPEGs each session uploads (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds any one wait may take (default 180)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        sessions = [int(n) for n in args.sessions.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sessions: expected comma-separated integers, received {args.sessions!r}")
    try:
        results = run_load_benchmark(Path(args.model), sessions=sessions, cycles=args.cycles,
                                     valid_per_session=args.valid_per_session, timeout=args.timeout)
    except LoadBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(f"{results['cpu']}, {results['logical_cores']} logical cores; model {results['model']}")
    print(format_table(results))
    for problem in results["log_problems"][:5]:
        print(f"  server log: {problem}")
    if args.out:
        from keras_ham.io_utils import write_json_atomic

        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
    failed = any(row["errors"] or row["leaks"] for row in results["rows"]) or results["log_problems"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
