"""coco_to_voc at train2017 scale: stage throughput and peak memory, and a per-core comparison
with torchvision's reference conversion, in the same run.

    python benchmarks/bench_coco_voc.py                  # ~2 min: 20,000 images (~143k anns)
    python benchmarks/bench_coco_voc.py --images 118287  # full train2017 scale: ~853k annotations,
                                                         # ~530 MB JSON; ~12 min in all (4 to generate)
    python benchmarks/bench_coco_voc.py --images 118287 --workdir /tmp/cocobench   # keep + reuse data
    python benchmarks/bench_coco_voc.py --quick         # seconds: checks the script still runs

1. Generates a synthetic COCO-format train2017: images 640 on the long side (333..640 short),
   7.3 annotations per image on average (heavy-tailed), star-shaped polygons with 20-30 vertices
   (10% of objects in two parts), 1.5% crowd annotations as uncompressed RLE, 30% person and the
   rest spread over the other 79 categories; packed like the real archives
   (annotations_trainval2017.zip, and train2017.zip holding empty files: the stage only lists it).
2. Runs the whole stage (`python -m stages.coco_to_voc`, min_pixels 1000 as in the full profile)
   with 1 and 2 workers, sampling the summed RSS of the stage process and all its children with
   psutil every 50 ms.
3. On the first --baseline-images images, one core, interleaved repeats (medians):
     project   pipeline.data.coco_paint worker: one frPyObjects+merge+decode per class, uint8 rules,
               unfiltered PNG with zlib RLE
     baseline  torchvision references/segmentation ConvertCocoPolysToMask: frPyObjects + decode
               per annotation, masks stacked as torch tensors, (masks * cats).max(0), overlap ->
               255, then PIL PNG (compress_level 1)
   both with and without the PNG encoding, every image converted (min_pixels 0).
Rates are given per wall second and per CPU second (the latter is what a shared machine can
still measure fairly).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from pycocotools import mask as mask_utils  # noqa: E402

from pipeline.classes import COCO_CATEGORIES  # noqa: E402
from pipeline.data.coco_paint import convert_task, label_map_from_rles, union_rle  # noqa: E402
from pipeline.data.coco_voc import plan_split  # noqa: E402
from pipeline.profiles import compose_profile

REPO = Path(__file__).resolve().parents[1]
TRAIN2017_IMAGES = 118287
ANNS_PER_IMAGE = 860001 / TRAIN2017_IMAGES
# the 80 COCO 2017 category ids (1..90 without the 10 unused ones)
# the real 80 COCO 2017 categories (ids 1..90 with gaps, COCO's names): the stage checks the
# names of the ids it maps
COCO_IDS = [c["id"] for c in COCO_CATEGORIES]


# --- 1. synthetic train2017 -------------------------------------------------------------------


def _polygon(rng: np.random.Generator, h: int, w: int, r: float) -> list[float]:
    n = int(rng.integers(20, 31))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.55, 1.0, n)
    xy = np.stack([np.clip(cx + rad * np.cos(ang), 0, w), np.clip(cy + rad * np.sin(ang), 0, h)], 1)
    return np.round(xy, 2).ravel().tolist()


def _uncompressed_rle(polys: list[list[float]], h: int, w: int) -> dict:
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return {"counts": counts.tolist(), "size": [h, w]}


def generate(workdir: Path, n_images: int, seed: int, keep_first: int) -> tuple[dict, dict]:
    """Write the two zips; return (stats, a small instances dict of the first images)."""
    rng = np.random.default_rng(seed)
    json_path = workdir / "instances_train2017.json"
    cat_p = np.full(len(COCO_IDS), 0.70 / (len(COCO_IDS) - 1))
    cat_p[COCO_IDS.index(1)] = 0.30
    small = {"images": [], "annotations": [], "categories": []}
    n_anns = ann_id = n_crowd = 0
    t = time.perf_counter()
    with open(json_path, "w") as f:
        f.write('{"info": {"description": "synthetic train2017-scale benchmark data"}, ')
        f.write('"licenses": [], "images": [')
        sizes = []
        for i in range(n_images):
            long_side, short = 640, int(rng.integers(333, 641))
            h, w = (short, long_side) if rng.random() < 0.7 else (long_side, short)
            sizes.append((h, w))
            img = {
                "license": 1,
                "file_name": f"{i + 1:012d}.jpg",
                "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "http://farm7.staticflickr.com/0000/0000000000_0000000000_z.jpg",
                "id": i + 1,
            }
            f.write((", " if i else "") + json.dumps(img))
            if i < keep_first:
                small["images"].append(img)
        f.write('], "annotations": [')
        # heavy-tailed count per image with the train2017 mean; ~1% of images have none
        counts = 1 + rng.negative_binomial(1.3, 1.3 / (1.3 + ANNS_PER_IMAGE - 1), n_images)
        counts[rng.random(n_images) < 0.01] = 0
        first = True
        for i, k in enumerate(counts):
            h, w = sizes[i]
            for _ in range(int(k)):
                ann_id += 1
                crowd = rng.random() < 0.015
                cat = int(rng.choice(COCO_IDS, p=cat_p))
                # log-uniform object size: many small objects, some large
                r = float(np.exp(rng.uniform(np.log(4), np.log(0.45 * min(h, w)))))
                polys = [_polygon(rng, h, w, r)]
                if rng.random() < 0.1:
                    polys.append(_polygon(rng, h, w, r / 2))
                if crowd:
                    seg = _uncompressed_rle([_polygon(rng, h, w, 2 * r)], h, w)
                    n_crowd += 1
                else:
                    seg = polys
                xs, ys = polys[0][0::2], polys[0][1::2]
                ann = {
                    "segmentation": seg,
                    "area": round(float(np.pi * r * r * 0.6), 2),
                    "iscrowd": int(crowd),
                    "image_id": i + 1,
                    "bbox": [
                        min(xs),
                        min(ys),
                        round(max(xs) - min(xs), 2),
                        round(max(ys) - min(ys), 2),
                    ],
                    "category_id": cat,
                    "id": ann_id,
                }
                f.write(("" if first else ", ") + json.dumps(ann))
                first = False
                n_anns += 1
                if i < keep_first:
                    small["annotations"].append(ann)
        cats = [dict(c) for c in COCO_CATEGORIES]
        small["categories"] = cats
        f.write('], "categories": ' + json.dumps(cats) + "}")
    json_mb = json_path.stat().st_size / 1e6
    t_json = time.perf_counter() - t
    with zipfile.ZipFile(
        workdir / "annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1
    ) as zf:
        zf.write(json_path, "annotations/instances_train2017.json")
    json_path.unlink()
    with zipfile.ZipFile(workdir / "train2017.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(n_images):
            zf.writestr(f"train2017/{i + 1:012d}.jpg", b"")
    stats = {
        "images": n_images,
        "annotations": n_anns,
        "crowd": n_crowd,
        "json_mb": round(json_mb, 1),
        "generate_s": round(time.perf_counter() - t, 1),
        "json_s": round(t_json, 1),
    }
    (workdir / "synthetic.json").write_text(json.dumps({"stats": stats, "small": small}))
    return stats, small


# --- 2. the stage, with the RSS of its whole process tree ------------------------------------


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the process + all its descendants, RSS of the process); 0 once it has exited."""
    total = parent = 0
    with contextlib.suppress(psutil.Error):
        parent = total = proc.memory_info().rss
        for c in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a child may exit between list and read
                total += c.memory_info().rss
    return total, parent


def run_stage(workdir: Path, workers: int, min_pixels: int) -> dict:
    params = compose_profile("sample", REPO / "conf")
    params["coco_to_voc"].update(
        {"splits": ["train2017"], "min_pixels": min_pixels, "workers": workers, "shard_size": 1000}
    )
    pfile = workdir / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    out = workdir / f"out_w{workers}"
    timings_file = workdir / f"timings_w{workers}.json"
    # the stage, run by this script's --child-stage: same command line, phases timed (below)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-stage", str(timings_file)]
    cmd += ["--params", str(pfile), "--raw-dir", str(workdir), "--out", str(out), "--no-progress"]
    peak = {"tree": 0, "parent": 0}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree, parent = _tree_rss(ps)
            peak["tree"] = max(peak["tree"], tree)
            peak["parent"] = max(peak["parent"], parent)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage + its waited-for workers
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"stage failed (workers={workers}):\n{stderr[-4000:]}")
    rep = json.loads((out / "report.json").read_text())["splits"]["train2017"]
    rep["timings_s"] = json.loads(timings_file.read_text())
    n, convert_s = rep["images_total"], rep["timings_s"]["convert_write"]
    rep["images_per_s"] = n / convert_s if convert_s > 0 else float("nan")
    return {
        "wall": wall,
        "cpu": cpu,
        "peak_tree": peak["tree"],
        "peak_parent": peak["parent"],
        "report": rep,
        "out": out,
    }


def child_stage(timings_file: Path, stage_argv: list[str]) -> None:
    """Run `python -m stages.coco_to_voc <stage_argv>` in this process and write its phase
    timings to `timings_file`.

    The stage's report.json holds no timings (it must hash the same on every run), so they are
    measured here: the two functions `convert_split` calls first are wrapped with a clock
    (JSON load = the streaming parse of the annotations, validate+group = `plan_split`); the
    rest of `convert_split` is the convert+write phase. Worker processes are spawned fresh and
    do not see the wrappers; they only run the per-image conversion.
    """
    import runpy

    from pipeline.data import coco_voc

    spent = {"load_json": 0.0, "validate_group": 0.0}

    def clocked(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    convert_split = coco_voc.convert_split
    total = {"s": 0.0}

    def convert_clocked(*a, **kw):
        t = time.perf_counter()
        try:
            return convert_split(*a, **kw)
        finally:
            total["s"] += time.perf_counter() - t

    coco_voc.read_instances_from_zip = clocked(coco_voc.read_instances_from_zip, "load_json")
    coco_voc.image_files_in_zip = clocked(coco_voc.image_files_in_zip, "load_json")
    coco_voc.plan_split = clocked(coco_voc.plan_split, "validate_group")
    coco_voc.convert_split = convert_clocked  # before the stage module imports the name
    sys.argv = ["stages.coco_to_voc", *stage_argv]
    code = 0
    try:
        runpy.run_module("stages.coco_to_voc", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    timings = {k: round(v, 3) for k, v in spent.items()}
    timings["convert_write"] = round(total["s"] - sum(spent.values()), 3)
    timings["total"] = round(total["s"], 3)
    timings_file.write_text(json.dumps(timings))
    sys.exit(code)


# --- 3. per-core comparison on a subset -------------------------------------------------------


def baseline_convert(anns: list[dict], h: int, w: int, encode: bool) -> object:
    """torchvision references/segmentation/coco_utils.py, VOC categories only (its filter)."""
    import torch
    from PIL import Image

    from pipeline.classes import COCO_TO_VOC

    anns = [a for a in anns if a["category_id"] in COCO_TO_VOC]  # FilterAndRemapCocoCategories
    if anns:
        masks = []
        for a in anns:  # convert_coco_poly_to_mask
            rles = mask_utils.frPyObjects(a["segmentation"], h, w)
            m = mask_utils.decode(rles)
            if m.ndim < 3:
                m = m[..., None]
            masks.append(torch.as_tensor(m, dtype=torch.uint8).any(dim=2))
        masks = torch.stack(masks, dim=0).to(torch.uint8)
        cats = torch.as_tensor([COCO_TO_VOC[a["category_id"]] for a in anns], dtype=masks.dtype)
        target, _ = (masks * cats[:, None, None]).max(dim=0)
        target[masks.sum(0) > 1] = 255
    else:
        target = torch.zeros((h, w), dtype=torch.uint8)
    im = Image.fromarray(target.numpy())
    if not encode:
        return im
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def project_convert(task: tuple, encode: bool) -> object:
    if encode:
        return convert_task(task, 0)
    _key, h, w, groups = task
    rles = {k: union_rle(s, h, w) for k, s in groups.items()}
    return np.ascontiguousarray(label_map_from_rles(rles, h, w))  # row-major, like the baseline


def per_core(small: dict, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    by_image: dict[int, list] = {img["id"]: [] for img in small["images"]}
    for a in small["annotations"]:
        by_image[a["image_id"]].append(a)
    base_items = [(by_image[img["id"]], img["height"], img["width"]) for img in small["images"]]
    plan = plan_split(json.loads(json.dumps(small)), "subset")
    tasks = plan["tasks"]
    n = len(tasks)
    for t, (anns, h, w) in zip(tasks[:5], base_items[:5], strict=True):  # warm-up + same maps
        ours = project_convert(t, encode=False)
        if ours.shape != (h, w):
            sys.exit("shape mismatch between project and baseline")
        baseline_convert(anns, h, w, True)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(name: str, fn, items) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for item in items:
            fn(*item)
        wall.setdefault(name, []).append(time.perf_counter() - t0)
        cpu.setdefault(name, []).append(time.process_time() - c0)

    for _ in range(repeats):  # interleaved: load changes on a shared machine hit both alike
        for encode in (True, False):
            tag = "" if encode else " (no PNG)"
            timed("baseline" + tag, baseline_convert, [(*it, encode) for it in base_items])
            timed("project" + tag, project_convert, [(t, encode) for t in tasks])
    return {k: (n / statistics.median(wall[k]), n / statistics.median(cpu[k])) for k in wall}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-stage"]:  # the stage run of run_stage (not for direct use)
        child_stage(Path(argv[1]), argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--images",
        type=int,
        default=20000,
        help=f"images to generate (full: {TRAIN2017_IMAGES}; default: %(default)s)",
    )
    ap.add_argument(
        "--baseline-images",
        type=int,
        default=1000,
        help="subset for the per-core comparison (default: %(default)s)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved repeats of the comparison (default: %(default)s)",
    )
    ap.add_argument(
        "--workers", default="1,2", help="stage runs, comma-separated (default: %(default)s)"
    )
    ap.add_argument(
        "--min-pixels", type=int, default=1000, help="as in the full profile (default: %(default)s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", type=Path, help="keep generated data here and reuse it when it matches"
    )
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs in --workdir")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="seconds: 200 images, 40 for the comparison, 1 repeat, 1 worker (checks it runs)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.baseline_images, args.repeats, args.workers = 200, 40, 1, "1"
    print(
        f"nproc {os.cpu_count()}, CPU: {cpu_model()}, RAM {psutil.virtual_memory().total / 2**30:.1f} GiB"
    )

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_coco_voc.")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        meta_file = workdir / "synthetic.json"
        cached = json.loads(meta_file.read_text()) if meta_file.exists() else None
        if (
            cached
            and cached["stats"]["images"] == args.images
            and len(cached["small"]["images"]) >= args.baseline_images
            and (workdir / "train2017.zip").exists()
        ):
            stats, small = cached["stats"], cached["small"]
            print(f"reusing synthetic data in {workdir}")
        else:
            stats, small = generate(workdir, args.images, args.seed, args.baseline_images)
        print(
            f"synthetic train2017: {stats['images']} images, {stats['annotations']} annotations "
            f"({stats['crowd']} crowd RLE), JSON {stats['json_mb']} MB; generated in {stats['generate_s']} s"
        )

        print(f"\nstage coco_to_voc (python -m stages.coco_to_voc), min_pixels {args.min_pixels}:")
        outs = []
        for workers in [int(x) for x in args.workers.split(",")]:
            r = run_stage(workdir, workers, args.min_pixels)
            rep, ts = r["report"], r["report"]["timings_s"]  # timings: measured by child_stage
            n = rep["images_total"]
            print(
                f"  workers={workers}: wall {r['wall']:.1f} s = {n / r['wall']:.0f} img/s end to end; "
                f"convert phase {rep['images_per_s']:.0f} img/s "
                f"(load JSON {ts['load_json']} s, validate+group {ts['validate_group']} s, "
                f"convert+write {ts['convert_write']} s); kept {rep['images_kept']}; "
                f"CPU {r['cpu']:.1f} s = {n / r['cpu']:.0f} img per CPU-s; "
                f"peak RSS all processes {r['peak_tree'] / 2**30:.2f} GiB (stage process {r['peak_parent'] / 2**30:.2f} GiB)"
            )
            outs.append(r["out"])
        if len(outs) > 1:
            same = all(
                sorted(p.name for p in o.rglob("*")) == sorted(p.name for p in outs[0].rglob("*"))
                and all(
                    (o / "train2017" / f.name).read_bytes() == f.read_bytes()
                    for f in (outs[0] / "train2017").iterdir()
                )
                for o in outs[1:]
            )
            print(f"  shard bytes identical across worker counts: {same}")
        if not args.keep:
            import shutil

            for o in outs:
                shutil.rmtree(o, ignore_errors=True)

        nsub = min(args.baseline_images, len(small["images"]))
        small = {
            "images": small["images"][:nsub],
            "annotations": [
                a for a in small["annotations"] if a["image_id"] <= small["images"][nsub - 1]["id"]
            ],
            "categories": small["categories"],
        }
        print(
            f"\nper core (1 process, torch 1 thread), first {nsub} images, median of {args.repeats}, min_pixels 0:"
        )
        rate = per_core(small, args.repeats)
        for k, (w, c) in rate.items():
            print(
                f"  {k:18s} {w:7.1f} img/s wall  {c:7.1f} img per CPU-s ({1e3 / c:.2f} ms CPU/img)"
            )
        for tag in ("", " (no PNG)"):
            (pw, pc), (bw, bc) = rate["project" + tag], rate["baseline" + tag]
            what = tag or " (with PNG)"
            print(f"  ratio project / baseline{what}: {pw / bw:.2f}x wall, {pc / bc:.2f}x CPU")
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
