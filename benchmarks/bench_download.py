"""Benchmark: `pipeline.data.download.fetch` vs the naive `urlopen(url).read()` + hashlib.

A local HTTP server (127.0.0.1, a thread of this process) serves a file of `--size` bytes that it
generates on the fly from a 1 MiB random block, so the server holds no copy of the file. Each
client runs in its own subprocess so that its peak RSS (ru_maxrss) is its own:

  fetch  pipeline.data.download.fetch(url, dest, md5=..., size=...): streamed, hashed on the fly
  naive  data = urlopen(url).read(); hashlib.md5(data); write the file

Both verify the md5 and write the file. Runs alternate (fetch, naive, fetch, ...); medians are
printed. The default 1 GiB takes well under a minute on 2 cores; `--size 100M` for a quick look.

  python benchmarks/bench_download.py [--size 1G] [--repeats 3]
  python benchmarks/bench_download.py --quick      # seconds: checks the script still runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = random.Random(0).randbytes(1 << 20)


def content_md5(size: int) -> str:
    h = hashlib.md5()
    full, tail = divmod(size, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:tail])
    return h.hexdigest()


class Handler(BaseHTTPRequestHandler):
    size = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        left = self.size
        view = memoryview(BLOCK)
        try:
            while left:
                n = min(left, len(BLOCK))
                self.wfile.write(view[:n])
                left -= n
        except (BrokenPipeError, ConnectionResetError):
            pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 1000000)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, url: str, dest: str, md5: str, size: int) -> None:
    """One measured client; prints a JSON line with its time and peak RSS."""
    t0 = time.perf_counter()
    if kind == "fetch":
        sys.path.insert(0, str(REPO))
        from pipeline.data.download import fetch

        fetch([url], Path(dest), md5=md5, size=size, retries=0, progress=True)
    elif kind == "naive":
        import urllib.request

        data = urllib.request.urlopen(url).read()
        if hashlib.md5(data).hexdigest() != md5:
            raise SystemExit("naive: md5 mismatch")
        Path(dest).write_bytes(data)
    elif kind == "idle":  # the floor: interpreter + the fetch module's imports
        sys.path.insert(0, str(REPO))
        import pipeline.data.download  # noqa: F401
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb()}))


def run_child(kind: str, url: str, dest: Path, md5: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, url, str(dest), md5, str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} client failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if kind != "idle":
        if dest.stat().st_size != size:
            raise SystemExit(f"{kind}: wrote {dest.stat().st_size} bytes, expected {size}")
        dest.unlink()
    return result


from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1G)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per client (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="where files land (default: tmp)")
    ap.add_argument("--child", nargs=5, metavar=("KIND", "URL", "DEST", "MD5", "SIZE"),
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="seconds: 4 MiB, 1 run per client")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 4 << 20, 1
    if args.child:
        kind, url, dest, md5, size = args.child
        child(kind, url, dest, md5, int(size))
        return

    size = args.size
    workdir = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.workdir))
    free = shutil.disk_usage(workdir).free
    if free < 2 * size:
        raise SystemExit(f"{workdir}: {free} bytes free, need {2 * size}; try a smaller --size")
    print(f"nproc {os.cpu_count()}, CPU {cpu_model()}, Python {platform.python_version()}")
    print(f"file: {size / 2**20:.0f} MiB generated on the fly by a server on 127.0.0.1")
    t0 = time.perf_counter()
    md5 = content_md5(size)
    print(f"expected md5 {md5} ({time.perf_counter() - t0:.1f} s to compute)")

    Handler.size = size
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/big.bin"
    results: dict[str, list[dict]] = {"fetch": [], "naive": []}
    try:
        idle = run_child("idle", url, workdir / "none", md5, size)
        for r in range(args.repeats):
            for kind in ("fetch", "naive"):
                res = run_child(kind, url, workdir / f"{kind}.bin", md5, size)
                results[kind].append(res)
                print(
                    f"  run {r + 1} {kind:5s}: {res['seconds']:.2f} s, peak RSS {res['rss_mb']:.0f} MB"
                )
    finally:
        httpd.shutdown()
        httpd.server_close()
        shutil.rmtree(workdir, ignore_errors=True)

    med = {
        k: (
            statistics.median(x["seconds"] for x in v),
            statistics.median(x["rss_mb"] for x in v),
        )
        for k, v in results.items()
    }
    print(f"\nmedians over {args.repeats} runs (download + md5 verify + file written):")
    print(f"{'client':28s} {'time s':>8s} {'MB/s':>8s} {'peak RSS MB':>12s}")
    print(f"{'python + imports (floor)':28s} {'':>8s} {'':>8s} {idle['rss_mb']:12.0f}")
    for kind, label in (("fetch", "fetch() streamed"), ("naive", "naive urlopen().read()")):
        secs, rss = med[kind]
        print(f"{label:28s} {secs:8.2f} {size / 1e6 / secs:8.0f} {rss:12.0f}")
    (fs, fr), (ns, nr) = med["fetch"], med["naive"]
    print(f"\nfetch vs naive: peak RSS {fr:.0f} vs {nr:.0f} MB ({nr / fr:.1f}x less)")
    print(f"speed {size / 1e6 / fs:.0f} vs {size / 1e6 / ns:.0f} MB/s (time ratio {fs / ns:.2f})")
    verdict = "OK" if fr < 100 else "OVER"
    print(f"target peak RSS < 100 MB for fetch: {verdict} ({fr:.0f} MB)")


if __name__ == "__main__":
    main()
