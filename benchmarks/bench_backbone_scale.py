"""Backbone and input convention vs the release's fixed rates: activation and gradient scales.

The FCN release fine-tunes the Caffe VGG16, fed BGR 0..255 minus the mean colour, with fixed
rates 1e-10/1e-12/1e-14 on a summed (unnormalised) loss, set for that net on that input. The
`paper` profile takes the Caffe VGG16 too (`download.vgg16.format: caffe`, through the model's
`CaffeInput`); `format: torchvision` would give it torchvision's VGG16, fed RGB 0..1 normalised
by the ImageNet mean/std, at the same rates. For each backbone with its own input convention
this measures, on real VOC sample images, full-width FCN-32s:

1. a probe on whole val images (their own size, as the release trains): RMS of the activations
   (conv1_1's input, pool5, fc7, score_fr, the upscored logits) and of the summed loss's
   gradients w.r.t. the score_fr, fc7 and conv1_1 weights; one SGD step at the release rate
   relative to the weight RMS, and what that step does to the logits; the top curvature of the
   summed loss in the score layer (power iteration), as lr x lambda_max;
2. 50 iterations of the `paper` profile's recipe (conf/profile/paper.yaml: batch 1, summed loss, lr 1e-10
   fixed, momentum 0.99, weight decay 5e-4, biases 2x, dropout 0.5, upsampling fixed) through
   the project's own model, solver and step code: the loss per iteration (finite? falling?),
   then the probe again, and how much of each layer's weights the 50 updates changed at all.

Why lr x lambda_max decides "plausible" (printed with each row's verdict): SGD with momentum mu
(PyTorch's and Caffe's form) on a quadratic of curvature lambda is stable iff
lr x lambda < 2(1 + mu) = 3.98 at mu 0.99; momentum does not move that limit much, it
multiplies a steady gradient's step by 1/(1 - mu) = 100. The score layers start at zero, where
every pixel's softmax is uniform over 21 classes; its curvature can grow up to 21/2 = 10.5x as
predictions sharpen, so lr x lambda_max <= 0.38 at the start keeps the whole run stable. Below
lr x lambda_max = 1e-5, even the fastest direction of the score layer needs more than 1/(100 x
lr x lambda) = 1000 iterations to settle (1 % of the release's 100k): the rate is then too small
for the convention. The backbone below the score layer gets no gradient at iteration 0 (a zero
layer passes none down) and then grows with score_fr; float32 rounds away an update under half
an ulp of the weight (2^-25..2^-24 of it, 3e-8..6e-8), so a backbone whose relative steps (lr x
grad / weight, up to x 100 with momentum) stay below that does not change at all.

    python benchmarks/bench_backbone_scale.py                 # stand-ins, ~8 min on 2 cores
    python benchmarks/bench_backbone_scale.py --torchvision-vgg16 vgg16-397923af.pth \
        --caffe-vgg16 VGG_ILSVRC_16_layers.caffemodel         # the real backbones
    python benchmarks/bench_backbone_scale.py --quick         # seconds: width 1/16, 4 its

Limits. The real weight files (torchvision's vgg16-397923af.pth and the Caffe
VGG_ILSVRC_16_layers.caffemodel, 553 MB each) cannot be downloaded on the machine that wrote
this. Without them each row uses a stand-in: the project's from-scratch init (`backbone_init:
random`, He fan-in, zero biases, seed 0), the same weights in both rows, fed each convention.
A ReLU net without biases is positively homogeneous, so the stand-in isolates the input
convention alone: every activation up to score_fr scales with the input's RMS (x ~58 for
Caffe's 0..255 range), the score layer's gradient with it and its curvature with its square.
It cannot tell the scales of the real nets, each trained on its own input range, with biases
that break the homogeneity: pass the real files for that. `--caffe-vgg16` takes the caffemodel
(converted in memory by `pipeline.models.caffe_vgg16`), the file that module converts it to,
or a plain torchvision-keyed VGG16 state dict, taken to expect Caffe's input; the FCN gets the
`CaffeInput` adapter, as imported Caffe weights do. `--torchvision-vgg16` takes a plain state
dict and refuses a converted Caffe file. Training uses `--crop` px crops (default 256, to fit
~10 min; the release pads whole images to 500 px): a summed loss over fewer pixels gives a
proportionally smaller gradient, so the probe, on whole images, is the figure to judge the rate
by. fp32 by default (`--precision auto` is bf16 on some CPUs).

Real data: the VOC 2012 sample folder `voc2012-sample/VOCdevkit/VOC2012`, found as the tests
find it (README, "Tests and the real data"): `$FCN_SHARED_DATA`, then `../shared/data` beside
the checkout; or `--voc DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `pipeline`
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import machine_line, shared_data  # noqa: E402  (benchmarks/machine.py)
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from pipeline.config import validate_params  # noqa: E402
from pipeline.data.datasets import decode_image_rgb, decode_label  # noqa: E402
from pipeline.data.transforms import eval_transform, train_transform  # noqa: E402
from pipeline.device import grad_scaler, resolve_precision  # noqa: E402
from pipeline.models.fcn import NORMALIZATION, CaffeInput  # noqa: E402
from pipeline.models.surgery import fix_upsampling, load_vgg16_backbone  # noqa: E402
from pipeline.profiles import compose_profile  # noqa: E402
from pipeline.training.recipe import ModelConfig, TrainConfig, model_config, train_config  # noqa: E402
from pipeline.training.solver import make_optimizer, summed_loss  # noqa: E402
from pipeline.training.start import build_initial_model, set_dropout  # noqa: E402
from pipeline.training.step import StepContext, train_one_step  # noqa: E402

ARCH = "fcn32s"
LAYERS = {"score_fr": "score_fr.weight", "fc7": "fc7.weight", "conv1_1": "features.0.weight"}
BIASES = {"fc7 bias": "fc7.bias", "conv1_1 bias": "features.0.bias"}
SHARPENING = 21 / 2  # top softmax curvature: 1/2 (two classes at 1/2) vs 1/21 (uniform)
SLOWEST = 1e-5  # lr x lambda_max below this: > 1000 iterations for the fastest direction


@dataclass(frozen=True)
class Row:
    """One backbone with its own input convention."""

    key: str  # A | B
    backbone: str
    convention: str
    weights: Path | None  # None: the stand-in
    caffe_input: bool

    def describe(self) -> str:
        src = str(self.weights) if self.weights else "stand-in (He fan-in init, seed 0)"
        return f"{self.key}  {self.backbone:18s} {self.convention:34s} {src}"

    def label(self) -> str:
        stand_in = "" if self.weights else " stand-in"
        return f"{self.key} ({self.backbone}{stand_in}, {self.convention.split(' (')[0]})"


@dataclass
class Probe:
    """Means over the probe images (lr_lambda: the largest; loss: the sum)."""

    act: dict[str, float] = field(default_factory=dict)  # RMS by layer
    grad: dict[str, float] = field(default_factory=dict)  # RMS of d(loss)/d(weight) by layer
    weight: dict[str, float] = field(default_factory=dict)  # RMS of the weight by layer
    dlogits: float = 0.0  # RMS change of the logits by one SGD step at the release rate
    lr_lambda: float = 0.0  # top eigenvalue of lr x Hessian, score_fr weight + bias
    loss: float = 0.0  # summed loss over all the probe images' pixels


def paper_recipe() -> tuple[TrainConfig, ModelConfig]:
    """The `paper` profile (conf/profile/paper.yaml, as Hydra composes it), typed."""
    cfg = copy.deepcopy(validate_params(compose_profile("paper", REPO / "conf")))
    return train_config(cfg), model_config(cfg)


def load_pairs(voc: Path, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` (uint8 image [3,H,W], uint8 label [H,W]) of a VOC split, decoded."""
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
    out = []
    for i in ids:
        jpg = voc / "JPEGImages" / f"{i}.jpg"
        png = voc / "SegmentationClass" / f"{i}.png"
        out.append((decode_image_rgb(jpg.read_bytes(), i), decode_label(png.read_bytes(), i)))
    return out


Weights = tuple[dict[str, torch.Tensor], CaffeInput | None, str]


def backbone_weights(row: Row) -> Weights:
    """(torchvision-keyed VGG16 state dict, the input adapter its weights need, how it was read)
    of the row's real weights file, read by `pipeline.models.caffe_vgg16`."""
    from pipeline.models.caffe_vgg16 import load_vgg16_weights, vgg16_state_dict_from_caffe

    path = row.weights
    assert path is not None
    if path.suffix == ".caffemodel":
        if not row.caffe_input:
            raise ValueError(f"{path}: a caffemodel is Caffe's VGG16: pass it as --caffe-vgg16")
        return vgg16_state_dict_from_caffe(path), CaffeInput(), "caffemodel, converted"
    state, spec = load_vgg16_weights(path)
    if spec != NORMALIZATION:
        if not row.caffe_input:
            raise ValueError(f"{path}: a converted Caffe VGG16: pass it as --caffe-vgg16")
        return state, CaffeInput.from_spec(spec), "converted Caffe VGG16 file"
    if row.caffe_input:  # a plain state dict given as Caffe's: taken at its word
        return state, CaffeInput(), "plain state dict, taken as weights for Caffe's input"
    return state, None, "torchvision state dict"


def build(
    row: Row, weights: Weights | None, tc: TrainConfig, mc: ModelConfig, width: float
) -> tuple[nn.Module, str]:
    """FCN-32s as the paper profile starts it (`pipeline.training.start.build_initial_model`:
    init_random, then the VGG16 backbone `weights`, the row's `backbone_weights`), for this
    row; and how its backbone was made."""
    model, _ = build_initial_model(
        ARCH, width=width, backbone_init="random", vgg16_path=None, init_from=None, seed=tc.seed
    )
    if weights is None:
        how = "stand-in: the project's from-scratch init (He fan-in, zero biases)"
        model.input_adapter = CaffeInput() if row.caffe_input else None
    else:
        state, model.input_adapter, how = weights
        load_vgg16_backbone(model, state, source=str(row.weights))
        how = f"{row.weights} ({how})"
    set_dropout(model, mc.dropout)
    if not tc.learn_upsampling:
        fix_upsampling(model)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.train(), how


def rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


@contextlib.contextmanager
def watch(model: nn.Module) -> Iterator[dict[str, object]]:
    """Record the RMS of the probed activations, and score_fr's input, during a forward."""
    seen: dict[str, object] = {}

    def tap(name: str, live: bool = False):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            seen[name] = rms(out)
            if live:  # the fraction of ReLU units that pass anything
                seen[f"{name} >0"] = float((out > 0).double().mean())

        return hook

    hooks = [
        model.features[0].register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("input", rms(args[0]))
        ),
        model.features[-1].register_forward_hook(tap("pool5", live=True)),
        model.relu7.register_forward_hook(tap("fc7", live=True)),
        model.score_fr.register_forward_hook(tap("score_fr")),
        model.score_fr.register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("feat", args[0].detach())
        ),
        model.register_forward_hook(tap("logits")),
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def score_curvature(
    model: nn.Module, feat: torch.Tensor, target: torch.Tensor, lrs: tuple[float, float], its: int
) -> tuple[float, float]:
    """(top eigenvalue of lr x Hessian of the summed loss in score_fr's weight and bias, RMS
    change of the logits by one plain SGD step), with score_fr's input `feat` held fixed.

    lr is per parameter (weight, bias: the optimiser's group rates). Power iteration on
    P^1/2 H P^1/2 (P: the rates), whose eigenvalues are those of lr x H.
    """
    c = model.crops["upscore"]
    h, w = target.shape[-2:]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.score_fr.parameters())

    def logits(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        s = functional_call(model.score_fr, {"weight": weight, "bias": bias}, (feat,))
        return model.upscore(s)[:, :, c : c + h, c : c + w]

    grads = torch.autograd.grad(summed_loss(logits(*params), target), params, create_graph=True)
    with torch.no_grad():
        step = [-lr * g for lr, g in zip(lrs, grads, strict=True)]
        delta = logits(*step) - logits(torch.zeros_like(step[0]), torch.zeros_like(step[1]))
    roots = [math.sqrt(lr) for lr in lrs]
    u = [g.detach().clone() for g in grads]  # start along the gradient
    lam = 0.0
    for _ in range(its):
        v = [r * x for r, x in zip(roots, u, strict=True)]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        z = [r * x for r, x in zip(roots, hv, strict=True)]
        norm_u = sum(float((x * x).sum()) for x in u)
        lam = sum(float((x * y).sum()) for x, y in zip(u, z, strict=True)) / max(norm_u, 1e-300)
        norm_z = math.sqrt(sum(float((x * x).sum()) for x in z))
        if norm_z == 0.0:
            break
        u = [x / norm_z for x in z]
    return lam, rms(delta)


def probe(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: list[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    power_its: int,
    channels_last: bool,
) -> Probe:
    """Forward + backward of each whole image (train mode: dropout masks seeded, the same
    before and after training); the gradients stay out of the optimiser's step."""
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    score_lrs = (lr_of[id(model.score_fr.weight)], lr_of[id(model.score_fr.bias)])
    out = Probe()
    to_nchw = eval_transform()
    for image, label in images:
        x, y = to_nchw(image, label)
        x, y = x.unsqueeze(0), y.unsqueeze(0).as_subclass(torch.Tensor)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with watch(model) as seen:
            loss = summed_loss(model(x), y)  # batch 1: what the paper's step divides by is 1
        loss.backward()
        lam, dlog = score_curvature(model, seen.pop("feat"), y, score_lrs, power_its)
        for k, v in seen.items():
            out.act[k] = out.act.get(k, 0.0) + v / len(images)
        for k, name in LAYERS.items():
            p = named[name]
            g = 0.0 if p.grad is None else rms(p.grad)
            out.grad[k] = out.grad.get(k, 0.0) + g / len(images)
            out.weight[k] = rms(p)
        out.dlogits += dlog / len(images)
        out.lr_lambda = max(out.lr_lambda, lam)
        out.loss += loss.item()
    model.zero_grad(set_to_none=True)
    return out


@dataclass
class Run:
    """The training of one row."""

    losses: list[float] = field(default_factory=list)  # summed loss per iteration
    pixels: list[int] = field(default_factory=list)  # valid pixels per iteration
    grads: list[dict[str, float]] = field(default_factory=list)  # RMS by layer per iteration
    logits: list[float] = field(default_factory=list)  # RMS of the logits per iteration
    # by LAYERS and BIASES: (fraction of elements changed, RMS(w - w0), RMS(w0))
    changed: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    nonfinite_at: int | None = None  # first iteration (1-based) with a NaN/inf loss
    wall_s: float = 0.0


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tc: TrainConfig,
    images: list[tuple[torch.Tensor, torch.Tensor]],
    crop: int,
    amp_dtype: torch.dtype | None,
) -> Run:
    """One iteration per image (batch 1, the paper's), through `train_one_step`; each crop is
    seeded by its index, so every row sees the same pixels in the same order."""
    device = torch.device("cpu")
    ctx = StepContext(
        model, opt, grad_scaler(device, amp_dtype), device, amp_dtype, tc.channels_last,
        tc.loss, world=1, distributed=False,
    )  # fmt: skip
    named = dict(model.named_parameters())
    start = {k: named[n].detach().clone() for k, n in {**LAYERS, **BIASES}.items()}
    augment = train_transform(crop, tc.scale_range, tc.hflip, tc.color_jitter)
    run = Run()
    seen: dict[str, float] = {}
    hook = model.register_forward_hook(lambda _m, _i, out: seen.__setitem__("logits", rms(out)))
    t0 = time.perf_counter()
    try:
        for i, (image, label) in enumerate(images):
            torch.manual_seed(tc.seed + i)
            x, y = augment(image, label)
            y = y.as_subclass(torch.Tensor)
            loss = float(train_one_step(ctx, [(x.unsqueeze(0), y.unsqueeze(0))]))
            run.losses.append(loss)
            run.pixels.append(int((y != 255).sum()))
            run.logits.append(seen["logits"])
            run.grads.append({k: rms(named[n].grad) for k, n in LAYERS.items()})
            if not math.isfinite(loss):
                run.nonfinite_at = i + 1
                break
    finally:
        hook.remove()
    run.wall_s = time.perf_counter() - t0
    for k, n in {**LAYERS, **BIASES}.items():
        w0, w1 = start[k], named[n].detach()
        run.changed[k] = (float((w0 != w1).double().mean()), rms(w1 - w0), rms(w0))
    return run


def fmt(v: float) -> str:
    return f"{v:9.3g}" if v else f"{'0':>9s}"


def print_table(title: str, columns: tuple[str, ...], lines: list[tuple[str, int, list]]) -> None:
    """One table: `title`, then a row per (row key, iteration, values) under `columns`."""
    print(title)
    print(f"row  {'it':>3s} " + " ".join(f"{c:>9s}" for c in columns))
    for key, it, values in lines:
        print(f"{key:3s}  {it:3d} " + " ".join(fmt(v) for v in values))


def print_probes(rows: list[tuple[Row, Probe, Probe, Run]], its: int, lr: float) -> None:
    """The activation and gradient tables, each probe before training (it 0) and after."""
    probes = [(row.key, it, p) for row, p0, p1, _ in rows for it, p in ((0, p0), (its, p1))]
    acts = ("input", "pool5", "pool5 >0", "fc7", "fc7 >0", "score_fr", "logits")
    print_table(
        "\nactivations, RMS (probe images; it 0 = before training, it N = after); >0: the "
        "fraction of units that are not zero",
        acts,
        [(key, it, [p.act[a] for a in acts]) for key, it, p in probes],
    )

    def gradients(p: Probe) -> list[float]:
        rel = [lr * p.grad[k] / p.weight[k] if p.weight[k] else 0.0 for k in LAYERS]
        return [p.grad[k] for k in LAYERS] + rel[1:] + [p.dlogits, p.lr_lambda]

    print_table(
        "\ngradients of the summed loss (RMS), one SGD step at the release rate: lr x RMS(grad)"
        " / RMS(weight), its change of the logits (RMS), top curvature lr x lambda_max",
        ("g score_fr", "g fc7", "g conv1_1", "step fc7", "step c1_1", "dlogits", "lr x lam"),
        [(key, it, gradients(p)) for key, it, p in probes],
    )


def print_training(rows: list[tuple[Row, Probe, Probe, Run]], window: int) -> None:
    """Loss windows, logits and gradients over the iterations, and what the updates changed."""
    n = max(len(r.losses) for *_, r in rows)
    spans = [(a, min(a + window, n)) for a in range(0, n, window)]
    print(f"\nsummed loss per crop, mean of each {window}-iteration window")
    print("row  " + " ".join(f"{f'{a + 1}-{b}':>9s}" for a, b in spans))
    for row, *_, run in rows:
        means = [sum(run.losses[a:b]) / max(len(run.losses[a:b]), 1) for a, b in spans]
        print(f"{row.key:3s}  " + " ".join(fmt(m) for m in means))
    print("\nsummed loss per valid pixel, every iteration (ln 21 = 3.04 at the zero start)")
    for row, *_, run in rows:
        per_pixel = [v / max(px, 1) for v, px in zip(run.losses, run.pixels, strict=True)]
        for a in range(0, len(per_pixel), 10):
            cells = " ".join(f"{v:6.3g}" for v in per_pixel[a : a + 10])
            print(f"{row.key:3s}  {f'{a + 1}-{min(a + 10, n)}':>6s}  {cells}")
    marks = sorted({1, 2, 5, 10, n // 2, n} & set(range(1, n + 1)))
    print("\nper iteration: RMS of the logits | of the gradients at score_fr, fc7, conv1_1")
    print("row  " + " ".join(f"{f'it {i}':>9s}" for i in marks))
    for row, *_, run in rows:
        for label, values in (
            ("logits", run.logits),
            *((f"g {k}", [g[k] for g in run.grads]) for k in LAYERS),
        ):
            cells = [fmt(values[i - 1]) if i <= len(values) else f"{'-':>9s}" for i in marks]
            print(f"{row.key:3s}  " + " ".join(cells) + f"  {label}")
    print(
        f"\nchanged by the {n} updates: fraction of elements, RMS(w - w0) relative to RMS(w0) "
        "(absolute where w0 = 0)"
    )
    for row, *_, run in rows:
        cells = [
            f"{k} {frac:.3g}, " + (f"{d / ref:.3g} rel" if ref else f"{d:.3g} abs")
            for k, (frac, d, ref) in run.changed.items()
        ]
        print(f"{row.key:3s}  " + "; ".join(cells))


def plausibility(lr_lambda: float, momentum: float) -> str:
    """The verdict on a fixed rate from lr x lambda_max at the start (the docstring's reasons)."""
    limit = 2 * (1 + momentum)
    if lr_lambda >= limit:
        return f"too large: over the momentum-SGD limit {limit:.3g} from the first step"
    if lr_lambda > limit / SHARPENING:
        return f"at risk: stable now, over the limit once predictions sharpen ({SHARPENING:g}x)"
    if lr_lambda < SLOWEST:
        return "too small: the score layer's fastest direction needs > 1000 iterations"
    return "plausible"


def verdict(row: Row, p0: Probe, p1: Probe, run: Run, lr: float, momentum: float) -> str:
    """The figures line of one row."""
    limit = 2 * (1 + momentum)
    k = min(5, len(run.losses))
    first = sum(run.losses[:k]) / sum(run.pixels[:k])
    last = sum(run.losses[-k:]) / sum(run.pixels[-k:])
    finite = run.nonfinite_at is None and all(math.isfinite(v) for v in run.losses)
    stable_lr = lr * limit / p0.lr_lambda if p0.lr_lambda > 0 else math.inf
    return (
        f"verdict {row.label()}: "
        f"lr x lambda_max = {p0.lr_lambda:.3g}, stable below lr {stable_lr:.3g} "
        f"({stable_lr / lr:.3g}x the release's {lr:g}): {plausibility(p0.lr_lambda, momentum)}; "
        f"loss per pixel, first {k} its {first:.4g} -> last {k} {last:.4g} "
        f"({last / first:.3f}x); probe loss {p0.loss:.4g} -> {p1.loss:.4g} "
        f"({p1.loss / p0.loss:.3f}x); weights changed: fc7 {100 * run.changed['fc7'][0]:.3g} %, "
        f"conv1_1 {100 * run.changed['conv1_1'][0]:.3g} %; finite: {finite}"
        + (f" (NaN/inf at iteration {run.nonfinite_at})" if run.nonfinite_at else "")
    )


def measure(
    row: Row,
    tc: TrainConfig,
    mc: ModelConfig,
    args: argparse.Namespace,
    data: tuple[list, list],
    weights: Weights | None,
) -> tuple[Row, Probe, Probe, Run]:
    """Probe, train, probe again: one row."""
    probe_images, train_images = data
    t0 = time.perf_counter()
    model, how = build(row, weights, tc, mc, args.width)
    print(f"# row {row.key} backbone: {how}", flush=True)
    lr = tc.stages[ARCH].lr
    opt = make_optimizer(model, lr, tc.momentum, tc.weight_decay, score_lr_mult=tc.score_lr_mult)
    amp = resolve_precision(args.precision, torch.device("cpu"))
    before = probe(model, opt, probe_images, tc.seed, args.power_its, tc.channels_last)
    run = train(model, opt, tc, train_images, args.crop, amp)
    after = probe(model, opt, probe_images, tc.seed, args.power_its, tc.channels_last)
    print(
        f"# row {row.key}: {time.perf_counter() - t0:.0f} s ({run.wall_s:.0f} s training, "
        f"{run.wall_s / max(len(run.losses), 1):.2f} s/it)",
        flush=True,
    )
    return row, before, after, run


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--torchvision-vgg16", type=Path, help="torchvision's vgg16-397923af.pth")
    ap.add_argument(
        "--caffe-vgg16",
        type=Path,
        help="the Caffe VGG16 as a torchvision-keyed state dict (weights for BGR 0..255 - mean)",
    )
    ap.add_argument("--iters", type=int, default=50, help="iterations of the recipe (default 50)")
    ap.add_argument("--crop", type=int, default=256, help="training crop, px (default 256)")
    ap.add_argument("--probe-images", type=int, default=2, help="whole val images probed")
    ap.add_argument("--power-its", type=int, default=20, help="power iterations for lambda_max")
    ap.add_argument("--width", type=float, default=1.0, help="VGG16 width (1.0: full)")
    ap.add_argument("--precision", choices=("fp32", "auto"), default="fp32")
    ap.add_argument("--voc", type=Path, help="VOC2012 folder (default: the shared-data lookup)")
    ap.add_argument("--quick", action="store_true", help="width 1/16, 4 its: the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.iters, args.crop, args.probe_images, args.power_its = 0.0625, 4, 64, 1, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    voc = args.voc or shared_data() / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    if not (voc / "ImageSets" / "Segmentation" / "train.txt").is_file():
        print(
            f"bench_backbone_scale: no VOC sample at {voc} (FCN_SHARED_DATA, --voc)",
            file=sys.stderr,
        )
        return 2
    tc, mc = paper_recipe()
    lr = tc.stages[ARCH].lr
    data = (load_pairs(voc, "val", args.probe_images), load_pairs(voc, "train", args.iters))
    rows = [
        Row(
            "A", "torchvision VGG16", "imagenet (RGB 0..1, mean/std)", args.torchvision_vgg16, False
        ),
        Row("B", "Caffe VGG16", "caffe_bgr (BGR 0..255 - mean)", args.caffe_vgg16, True),
    ]
    print(f"# machine: {machine_line()}, torch {torch.__version__}, device cpu, {args.precision}")
    print(
        f"# paper profile: {ARCH} width {args.width}, batch {tc.batch_size}, loss {tc.loss}, "
        f"lr {lr:g} {tc.lr_policy}, momentum {tc.momentum}, weight decay {tc.weight_decay}, "
        f"biases 2x, score_lr_mult {tc.score_lr_mult:g}, dropout {mc.dropout}, upsampling "
        f"{'learned' if tc.learn_upsampling else 'fixed'}; {args.iters} its on {args.crop} px "
        f"crops of the first {len(data[1])} real VOC train images; probe: {len(data[0])} whole "
        f"val images ({', '.join('x'.join(map(str, im.shape[1:])) for im, _ in data[0])})"
    )
    for row in rows:
        print(f"# {row.describe()}")
    try:  # every file read before the first row's minutes
        weights = {r.key: backbone_weights(r) if r.weights else None for r in rows}
    except (OSError, ValueError) as e:
        print(f"bench_backbone_scale: {e}", file=sys.stderr)
        return 2
    results = [measure(row, tc, mc, args, data, weights[row.key]) for row in rows]
    print_probes(results, args.iters, lr)
    print_training(results, window=5)
    print()
    for r in results:
        print(verdict(*r, lr=lr, momentum=tc.momentum))
    return 0


if __name__ == "__main__":
    sys.exit(main())
