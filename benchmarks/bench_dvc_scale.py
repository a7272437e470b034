"""Benchmark: DVC at full scale (sharded dataset vs one file per image) and the sample run.

Part 1 (default): does `dvc repro`/`dvc status` stay fast on a full-size processed dataset?
In a temporary git + DVC repo, a stage writes a simulated `data/preprocessed/train`: `--images`
records (default 120,000, about VOC train + COCO 2017 train with VOC classes) of random bytes
(an "image" blob of `--bytes-per-image` on average and a "label" blob of `--label-bytes`, plus
the usual meta) and a second stage depends on it and writes a small summary. The same records
are stored two ways, each in its own repo:

  shards   the project's format: pipeline.data.shards.ShardWriter, shard_size 1000
           (120 shard files + index.json for 120k images)
  files    the naive layout (the baseline): images/<key>.jpg + labels/<key>.png, as in VOC's
           JPEGImages/SegmentationClass - two small files per image

For each: first `dvc repro` (split into the stage's own write time and the rest, DVC's
hashing/caching), no-op `dvc repro` and no-op `dvc status` (median of `--repeats`, interleaved
across the repos), `dvc push` to a local remote, `git clone` + `dvc pull` into a fresh dir.
Every no-op is checked to run nothing and every clone to be up to date.

The one-file-per-image baseline at 120k images (240k files) takes many minutes per step, so by
default it runs at `--baseline-images` (10,000 images = 20,000 files) and is extrapolated
linearly in the file count to `--images` (clearly labelled): shards@images (same bytes) plus
the per-file cost measured like for like against a shards repo at the baseline size (which also
gives a measured ratio). A run at half the baseline size checks that the cost is linear. `--full` runs everything at full count and a realistic size
(55 KB JPEG + 5 KB PNG per image, about 7 GB; DVC copies it into the cache, the remote, and the
clone's cache and workspace: ~40 GB of free disk per layout and a long run).

Part 2 (`--sample-run`): the README quick-start figures. In a temporary copy of the project
(tests/repo_utils.copy_repo, the default sample params): the first `dvc repro` (the whole
pipeline; the README claims <= 10 min on 2 cores), no-op `dvc repro` and `dvc status`,
`dvc remote add -d` a local dir + `dvc push`, `git clone` + `dvc pull`, and `dvc repro` in the
clone, which must run nothing.

  python benchmarks/bench_dvc_scale.py                   # part 1, about 3 min on 2 cores
  python benchmarks/bench_dvc_scale.py --full            # part 1 at real size (long, ~80 GB)
  python benchmarks/bench_dvc_scale.py --sample-run      # part 2 only (several minutes)
  python benchmarks/bench_dvc_scale.py --both            # part 1, then part 2
  python benchmarks/bench_dvc_scale.py --quick           # seconds: checks the script still runs

All times are wall-clock seconds of the real `dvc`/`git` CLIs (DVC_NO_ANALYTICS=1), including
DVC's own start-up (reported on its own as `dvc version`). The machine may be shared: read
medians, and the load average printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.atomic import atomic_dir, atomic_write_json  # noqa: E402
from pipeline.data.shards import ShardReader, ShardWriter  # noqa: E402

SCRIPT = "benchmarks/bench_dvc_scale.py"
# copied into each temporary repo: the stages run the project's real writer code
# what the stage commands import: the script, its machine-description helper and the shard code
REPO_FILES = (
    SCRIPT,
    "benchmarks/machine.py",
    "pipeline/__init__.py",
    "pipeline/atomic.py",
    "pipeline/data/shards.py",
)
SHARD_SIZE = 1000


# --- the stage commands (run by DVC inside the temporary repos) ---------------------------------


def _records(
    images: int, bytes_per_image: int, label_bytes: int, seed: int
) -> Iterator[tuple[str, dict[str, bytes], dict[str, object]]]:
    """Deterministic (key, blobs, meta) records; image sizes vary +-50% around the mean."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(bytes_per_image // 2, bytes_per_image * 3 // 2 + 1, size=images)
    for i, size in enumerate(sizes):
        key = f"coco/{i:012d}"
        blobs = {"image": rng.bytes(int(size)), "label": rng.bytes(label_bytes)}
        yield key, blobs, {"height": 384, "width": 512, "source": "coco"}


def write_dataset(
    layout: str, out: Path, images: int, bytes_per_image: int, label_bytes: int, seed: int
) -> float:
    """Write the simulated dataset atomically; returns the seconds it took."""
    t0 = time.perf_counter()
    records = _records(images, bytes_per_image, label_bytes, seed)
    if layout == "shards":
        with ShardWriter(out, shard_size=SHARD_SIZE) as w:
            for key, blobs, meta in records:
                w.add(key, blobs, meta)
    elif layout == "files":
        with atomic_dir(out) as tmp:
            (tmp / "images").mkdir()
            (tmp / "labels").mkdir()
            for key, blobs, _ in records:
                name = key.replace("/", "_")
                (tmp / "images" / f"{name}.jpg").write_bytes(blobs["image"])
                (tmp / "labels" / f"{name}.png").write_bytes(blobs["label"])
    else:
        raise ValueError(f"unknown layout {layout!r} (shards or files)")
    return time.perf_counter() - t0


def summarize(layout: str, data: Path, out: Path) -> None:
    """The downstream stage: reads the dataset's index (or listing), writes a small file."""
    if layout == "shards":
        r = ShardReader(data)
        n, nbytes = len(r), sum(sum(s[1] for s in rec["blobs"].values()) for rec in r.records)
    else:
        files = [e for d in ("images", "labels") for e in os.scandir(data / d)]
        n, nbytes = len(files) // 2, sum(e.stat().st_size for e in files)
    atomic_write_json(out, {"records": n, "bytes": nbytes})


# --- running the CLIs ---------------------------------------------------------------------------


from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def make_env(site_cache: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        DVC_NO_ANALYTICS="1",
        # DVC's state/index db of each temporary repo goes with it, not to /var/tmp/dvc
        DVC_SITE_CACHE_DIR=str(site_cache),
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
        PYTHONUNBUFFERED="1",
    )
    e.pop("PYTHONPATH", None)  # stages use the repo's own copy of the code
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


class Runner:
    def __init__(self, env: dict[str, str], verbose: bool = False) -> None:
        self.env, self.verbose = env, verbose

    def __call__(self, args: list[str], cwd: Path, timeout: float = 3600) -> tuple[float, str]:
        """Run a command, fail loudly on a non-zero exit; returns (seconds, stdout+stderr)."""
        if self.verbose:
            print(f"  $ {' '.join(args)}   [{cwd}]", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(
            args, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        dt = time.perf_counter() - t0
        out = p.stdout + p.stderr
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({p.returncode}) in {cwd}:\n{out[-4000:]}")
        return dt, out


def stages_run(output: str) -> list[str]:
    return [
        ln.split("'")[1] for ln in output.splitlines() if ln.strip().startswith("Running stage '")
    ]


def check_noop(out: str, what: str, where: Path) -> None:
    ran = stages_run(out)
    if ran:
        raise SystemExit(f"{where}: no-op `{what}` ran stages {ran}:\n{out[-2000:]}")


def check_up_to_date(out: str, where: Path) -> None:
    if "up to date" not in out:
        raise SystemExit(f"{where}: `dvc status` is not up to date:\n{out[-2000:]}")


def median_rounds(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each fn `repeats` times, interleaved, order rotated each round; medians."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(fns[name]())
    return {k: statistics.median(v) for k, v in times.items()}


# --- part 1: the scale benchmark ----------------------------------------------------------------

STEPS = (
    ("write", "stage's own write (in 1st repro)"),
    ("repro_dvc", "1st dvc repro minus the write"),
    ("repro", "first dvc repro, total"),
    ("noop_repro", "no-op dvc repro (median)"),
    ("noop_status", "no-op dvc status (median)"),
    ("push", "dvc push (local remote)"),
    ("clone", "git clone"),
    ("pull", "dvc pull (fresh clone)"),
    ("clone_status", "dvc status in the clone"),
    ("clone_repro", "dvc repro in the clone (no-op)"),
)


def dvc_yaml(layout: str, images: int, bpi: int, label_bytes: int, seed: int) -> str:
    write = (
        f"python {SCRIPT} --stage-write {layout} data/train --images {images} "
        f"--bytes-per-image {bpi} --label-bytes {label_bytes} --seed {seed}"
    )
    return (
        "stages:\n"
        "  make_dataset:\n"
        f"    cmd: {write}\n"
        f"    deps: [{SCRIPT}, pipeline/data/shards.py, pipeline/atomic.py]\n"
        "    outs: [data/train]\n"
        "  summarize:\n"
        f"    cmd: python {SCRIPT} --stage-summarize {layout} data/train summary.json\n"
        f"    deps: [{SCRIPT}, data/train]\n"
        "    outs: [summary.json]\n"
    )


def setup_repo(run: Runner, repo: Path, yaml_text: str) -> None:
    repo.mkdir(parents=True)
    for f in REPO_FILES:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    (repo / "dvc.yaml").write_text(yaml_text)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.autostage", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "benchmark repo"], repo)


def first_repro(run: Runner, repo: Path) -> dict[str, float]:
    dt, out = run(["dvc", "repro"], repo)
    if stages_run(out) != ["make_dataset", "summarize"]:
        raise SystemExit(f"{repo}: first dvc repro did not run both stages:\n{out[-2000:]}")
    write = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"write_s"')))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    return {"repro": dt, "write": write["write_s"], "repro_dvc": dt - write["write_s"]}


def push_clone_pull(
    run: Runner, repo: Path, remote: Path, clone: Path, strict: bool = True
) -> dict[str, float]:
    """Push to a local remote, clone, pull; strict: the clone must be up to date and a no-op."""
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo)
    run(["git", "add", ".dvc/config"], repo)
    run(["git", "commit", "-qm", "remote"], repo)
    res = {}
    res["push"], _ = run(["dvc", "push"], repo)
    res["clone"], _ = run(["git", "clone", "-q", str(repo), str(clone)], clone.parent)
    res["pull"], _ = run(["dvc", "pull"], clone)
    res["clone_status"], out = run(["dvc", "status"], clone)
    if strict:
        check_up_to_date(out, clone)
    elif "up to date" not in out:
        print(f"  NOT up to date after dvc pull: `dvc status` in the clone says:\n{out}")
    res["clone_repro"], out = run(["dvc", "repro"], clone)
    if strict:
        check_noop(out, "dvc repro", clone)
    elif stages_run(out):
        print(f"  dvc repro in the clone RAN {', '.join(stages_run(out))} (expected nothing)")
    return res


def bench_scale(args: argparse.Namespace, work: Path, run: Runner) -> None:
    n, m = args.images, min(args.baseline_images, args.images)
    extrapolate = m < n
    variants: dict[str, tuple[str, int]] = {f"shards@{n}": ("shards", n)}
    if extrapolate:
        variants[f"shards@{m}"] = ("shards", m)
        variants[f"files@{m // 2}"] = ("files", m // 2)
    variants[f"files@{m}"] = ("files", m)

    files_of = {"shards": lambda k: -(-k // SHARD_SIZE) + 1, "files": lambda k: 2 * k}
    mean = args.bytes_per_image + args.label_bytes
    print(
        f"\n== Part 1: {n:,} images x ~{mean:,} B (~{n * mean / 1e9:.2f} GB); "
        f"shard_size {SHARD_SIZE}; baseline measured at {m:,}"
        + (
            f" (and {m // 2:,} for a linearity check), extrapolated linearly to {n:,}"
            if extrapolate
            else ""
        )
    )
    repos = {}
    res: dict[str, dict[str, float]] = {}
    for name, (layout, k) in variants.items():
        repo = work / name.replace("@", "_") / "repo"
        text = dvc_yaml(layout, k, args.bytes_per_image, args.label_bytes, args.seed)
        setup_repo(run, repo, text)
        repos[name] = repo
        print(f"  {name}: {files_of[layout](k):,} files, first dvc repro ...", flush=True)
        res[name] = first_repro(run, repo)

    def noop(what: list[str], repo: Path, check: Callable[[str, Path], None]):
        def fn() -> float:
            dt, out = run(what, repo)
            check(out, repo)
            return dt

        return fn

    print(f"  no-op dvc repro / dvc status, {args.repeats} interleaved rounds ...", flush=True)
    fns = {}
    for name, repo in repos.items():
        fns[(name, "noop_repro")] = noop(
            ["dvc", "repro"], repo, lambda o, r: check_noop(o, "dvc repro", r)
        )
        fns[(name, "noop_status")] = noop(["dvc", "status"], repo, check_up_to_date)
    for (name, step), t in median_rounds(fns, args.repeats).items():
        res[name][step] = t
    for name, repo in repos.items():
        print(f"  {name}: dvc push, git clone, dvc pull ...", flush=True)
        base = repo.parent
        res[name].update(push_clone_pull(run, repo, base / "remote", base / "clone"))
        summary = json.loads((base / "clone" / "summary.json").read_text())
        if summary != json.loads((repo / "summary.json").read_text()):
            raise SystemExit(f"{base / 'clone'}: the pulled dataset differs from the original")
        if args.full and not args.keep:  # free the disk (~40 GB) before the next one
            shutil.rmtree(base)

    cols = list(variants)
    head = f"{'step (seconds)':36s}" + "".join(f"{c:>15s}" for c in cols)
    if extrapolate:
        head += f"{f'files@{n} ext.':>19s}"
    head += f"{'files/shards':>14s}"
    print("\n" + head)
    print(
        f"{'  (files in the output)':36s}"
        + "".join(f"{files_of[variants[c][0]](variants[c][1]):>15,}" for c in cols)
        + (f"{2 * n:>19,}" if extrapolate else "")
    )
    half, full = f"files@{m // 2}", f"files@{m}"
    # the extrapolation: t(files@n) = t(shards@n) + per-file cost * (extra files). shards@n holds
    # the same bytes (so the fixed and per-byte costs are measured); the per-file cost is the
    # like-for-like difference files@m - shards@m over their difference in file count
    extra_files_m = files_of["files"](m) - files_of["shards"](m)
    extra_files_n = files_of["files"](n) - files_of["shards"](n)
    for step, label in STEPS:
        row = f"{label:36s}" + "".join(f"{res[c][step]:15.2f}" for c in cols)
        if step == "clone":  # git only: the dataset is not in git, nothing to scale
            print(row)
            continue
        if extrapolate:
            per_file = (res[full][step] - res[f"shards@{m}"][step]) / extra_files_m
            ext = res[f"shards@{n}"][step] + per_file * extra_files_n
            row += f"{ext:19.2f}"
            ratio = f"{res[full][step] / res[f'shards@{m}'][step]:6.1f}x @{m:,}"
            ratio += f" {ext / res[f'shards@{n}'][step]:6.1f}x @{n:,}"
        else:
            ratio = f"{res[full][step] / res[f'shards@{n}'][step]:6.1f}x"
        print(row + "  " + ratio)
    if not extrapolate:
        return
    print(
        f"files@{n} ext. = EXTRAPOLATED, not measured: shards@{n} (same bytes) + the per-file "
        f"cost of files@{m} over shards@{m} times the {extra_files_n:,} extra files."
    )
    print("baseline's per-file cost, seconds per 1000 files (like-for-like | files@m/2->m slope):")
    for step, label in STEPS:
        if step == "clone":
            continue
        a = 1e3 * (res[full][step] - res[f"shards@{m}"][step]) / extra_files_m
        b = 1e3 * (res[full][step] - res[half][step]) / (2 * (m - m // 2))
        print(f"  {label:36s} {a:7.3f} | {b:7.3f}")


# --- part 2: the sample run ---------------------------------------------------------------------


def bench_sample_run(args: argparse.Namespace, work: Path, run: Runner) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from repo_utils import copy_repo

    print("\n== Part 2: the sample run (default sample params), copy of the project", flush=True)
    repo = copy_repo(work / "sample" / "repo")
    res: dict[str, float] = {}
    print("  first dvc repro (the whole pipeline) ...", flush=True)
    res["first dvc repro (whole pipeline)"], out = run(["dvc", "repro"], repo, timeout=7200)
    ran = stages_run(out)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)

    def noop(what: list[str], check: Callable[[str, Path], None]):
        def fn() -> float:
            dt, o = run(what, repo)
            check(o, repo)
            return dt

        return fn

    meds = median_rounds(
        {
            "no-op dvc repro (median)": noop(
                ["dvc", "repro"], lambda o, r: check_noop(o, "dvc repro", r)
            ),
            "no-op dvc status (median)": noop(["dvc", "status"], check_up_to_date),
        },
        args.repeats,
    )
    res.update(meds)
    clone = work / "sample" / "clone"
    steps = push_clone_pull(run, repo, work / "sample" / "remote", clone, strict=False)
    res["dvc push (local remote)"] = steps["push"]
    res["git clone"] = steps["clone"]
    res["dvc pull (fresh clone)"] = steps["pull"]
    res["git clone + dvc pull"] = steps["clone"] + steps["pull"]
    res["dvc status in the clone"] = steps["clone_status"]
    res["dvc repro in the clone"] = steps["clone_repro"]
    cache = sum(f.stat().st_size for f in (repo / ".dvc" / "cache").rglob("*") if f.is_file())
    print(f"\nstages run by the first dvc repro: {', '.join(ran)}")
    print(f"DVC cache after the run: {cache / 1e6:.1f} MB")
    print(f"{'step':40s} {'seconds':>9s}")
    for k, v in res.items():
        print(f"{k:40s} {v:9.2f}")
    limit = 600
    verdict = "within" if res["first dvc repro (whole pipeline)"] <= limit else "OVER"
    print(f"README quick-start claim (<= {limit} s on 2 cores): {verdict}")


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--images", type=int, default=120_000, help="records at full scale (default %(default)s)"
    )
    ap.add_argument(
        "--bytes-per-image",
        type=int,
        default=4096,
        help="mean image blob size; real train shards (512 px JPEG q90) hold about 55,000 "
        "(default %(default)s)",
    )
    ap.add_argument(
        "--label-bytes", type=int, default=512, help="label blob size (default %(default)s)"
    )
    ap.add_argument(
        "--baseline-images",
        type=int,
        default=10_000,
        help="images in the one-file-per-image baseline; below --images it also runs at half "
        "this and is extrapolated (default %(default)s)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds of each no-op (default %(default)s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--full",
        action="store_true",
        help="real size: 55,000 + 5,000 B per image, baseline at --images (hours, ~80 GB disk)",
    )
    ap.add_argument("--sample-run", action="store_true", help="part 2 only: the sample run")
    ap.add_argument("--both", action="store_true", help="part 1, then part 2")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="parent of the temp dir (default: system tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary repos")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="part 1 at 200 records (baseline 20), 1 repeat: checks the script still runs",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print every command")
    # the stage commands of the temporary repos (not for direct use)
    ap.add_argument("--stage-write", nargs=2, metavar=("LAYOUT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--stage-summarize", nargs=3, metavar=("LAYOUT", "DATA", "OUT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)

    if args.stage_write:
        layout, out = args.stage_write
        dt = write_dataset(
            layout, Path(out), args.images, args.bytes_per_image, args.label_bytes, args.seed
        )
        print(json.dumps({"write_s": dt}))
        return 0
    if args.stage_summarize:
        layout, data, out = args.stage_summarize
        summarize(layout, Path(data), Path(out))
        return 0

    if args.full:
        args.bytes_per_image, args.label_bytes, args.baseline_images = 55_000, 5_000, args.images
    if args.quick:
        args.images, args.baseline_images, args.repeats = 200, 20, 1
        args.bytes_per_image, args.label_bytes = 256, 64
    for name in ("images", "baseline_images", "bytes_per_image", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.baseline_images < 2:
        ap.error("--baseline-images must be >= 2")

    dvc_version = subprocess.run(
        ["dvc", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    git_version = subprocess.run(
        ["git", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"nproc {os.cpu_count()}, {cpu_model()}; dvc {dvc_version}, {git_version}")
    print(f"load average at start: {loadavg()}")
    work = Path(tempfile.mkdtemp(prefix="bench_dvc_scale_", dir=args.workdir))
    run = Runner(make_env(work / "dvc-site-cache"), args.verbose)
    try:
        t, _ = run(["dvc", "version"], work)
        ts = [t] + [run(["dvc", "version"], work)[0] for _ in range(2)]
        print(f"dvc start-up (`dvc version`, median of 3): {statistics.median(ts):.2f} s")
        if not args.sample_run or args.both:
            bench_scale(args, work, run)
        if args.sample_run or args.both:
            bench_sample_run(args, work, run)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
