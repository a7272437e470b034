"""pipeline.inference.speed, pipeline.inference.export, pipeline.reports.model_card and their two DVC stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import CASCADE, validate_params
from pipeline.evaluation.summary import scored_set_name
from pipeline.inference import export, speed
from pipeline.models import fcn
from pipeline.reports.model_card import card_recipe, model_card
from tests.helpers import import_or_skip, write_val_shards
from tests.repo_utils import profile_params, tiny_params, write_tiny_params

REPO = Path(__file__).resolve().parents[1]


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A width-1/32 model whose score layers are not zero (so its argmax is not constant)."""
    torch.manual_seed(seed)
    model = fcn.build_model(name, num_classes=21, width=1 / 32)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith("score"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def fcn8s_onnx(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    import_or_skip("onnxruntime")
    model = tiny("fcn8s")
    path = tmp_path_factory.mktemp("onnx") / "fcn8s.onnx"
    export.export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def generated_val_dir(tmp_path_factory, generated_voc: Path) -> Path:
    ids = (generated_voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return write_val_shards(tmp_path_factory.mktemp("gen") / "val", generated_voc, ids)


# --- ONNX ------------------------------------------------------------------------------------


def test_onnx_agrees_with_pytorch_at_two_odd_sizes(fcn8s_onnx):
    model, path = fcn8s_onnx
    onnx = import_or_skip("onnx")
    graph = onnx.load(str(path)).graph
    for value in (graph.input[0], graph.output[0]):  # [1, C, H, W] with symbolic H and W
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[:2]] in ([1, 3], [1, 21])
        assert dims[2].dim_param and dims[3].dim_param, value
    inputs = export.check_inputs(random_sizes=[(97, 131), (203, 157)])
    report = export.verify_onnx(model, path, inputs)
    assert set(report["checks"]) == {"random_97x131", "random_203x157"}
    for check in report["checks"].values():
        assert check["argmax_agreement"] >= 0.999, report
        assert check["max_abs_diff"] < 1e-3, report
    export.require_agreement(report, 0.999, "fcn8s")  # no error


def test_onnx_file_names_no_source_path_and_repeats_byte_for_byte(fcn8s_onnx, tmp_path):
    model, path = fcn8s_onnx
    data = path.read_bytes()
    repo = str(Path(export.__file__).resolve().parents[1]).encode()
    assert repo not in data and export.STACK_TRACE_KEY.encode() not in data
    again = export.export_onnx(model, tmp_path / "again.onnx")
    assert again.read_bytes() == data  # a second checkout of the commit writes the same file


def test_onnx_agrees_on_real_val_images_at_odd_sizes(fcn8s_onnx, voc_sample: Path, tmp_path):
    model, path = fcn8s_onnx
    ids = (voc_sample / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    val_dir = write_val_shards(tmp_path / "val", voc_sample, ids)
    images, keys = speed.load_val_images(val_dir, 2)
    inputs = export.check_inputs(images, keys, random_sizes=())
    assert len(inputs) == 2
    for x in inputs.values():
        assert x.shape[2] % 2 == 1 and x.shape[3] % 2 == 1
    report = export.verify_onnx(model, path, inputs)
    assert report["min_argmax_agreement"] >= 0.999, report


def test_a_disagreeing_export_fails_and_leaves_no_file(tmp_path, monkeypatch):
    def fake_export(model, path, opset=18):
        Path(path).write_bytes(b"not checked")

    def fake_verify(model, path, inputs):
        check = {"height": 97, "width": 131, "max_abs_diff": 3.0, "argmax_agreement": 0.95}
        return {"checks": {"random_97x131": check}}

    monkeypatch.setattr(export, "export_onnx", fake_export)
    monkeypatch.setattr(export, "verify_onnx", fake_verify)
    target = tmp_path / "onnx" / "fcn8s.onnx"
    with pytest.raises(export.OnnxMismatchError, match=r"95\.000% .*random_97x131.*99\.900%"):
        export.export_verified(tiny("fcn32s"), target, {})
    assert list(target.parent.iterdir()) == []


# --- inference figures -----------------------------------------------------------------------


def test_inference_report_fields(one_thread):
    model = tiny("fcn16s")
    g = torch.Generator().manual_seed(0)
    val = [torch.randn(3, 67, 91, generator=g), torch.randn(3, 45, 45, generator=g)]
    r = speed.benchmark_model(model, val, device="cpu", warmup=1, repeats=3, size=(96, 80))
    assert r["parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert r["gflops_96x80"] > 0
    for key in ("at_96x80", "at_val_sizes"):
        at = r[key]
        assert at["images_per_s"] > 0 and at["latency_p50_ms"] > 0
        assert at["latency_p95_ms"] >= at["latency_p50_ms"]
    assert r["at_val_sizes"]["images"] == 2 and r["at_val_sizes"]["sizes"] == "45x45, 67x91"
    assert r["peak_memory_mib"] >= 0 and r["peak_memory_method"].startswith("cpu: psutil")
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["threads"] == 1
    assert torch.__version__ in r["machine"] and r["cpu"] in r["machine"]
    json.dumps(r)  # a metrics file: plain JSON


def test_gflops_grow_with_the_input_and_leave_the_model_alone():
    model = tiny("fcn8s")
    small, large = speed.count_gflops(model, 100, 100), speed.count_gflops(model, 500, 500)
    assert 0 < small < large
    assert speed.count_gflops(model, 500, 500) == large  # a count, not a timing
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match="1x1"):
        speed.count_gflops(model, 0, 10)


def test_latency_summary_percentiles():
    s = speed.latency_summary([10.0] * 19 + [100.0])
    assert s["latency_p50_ms"] == 10.0 and s["latency_p95_ms"] > 10.0
    assert s["images_per_s"] == pytest.approx(20 / 0.29)
    with pytest.raises(ValueError):
        speed.latency_summary([])


# --- model card ------------------------------------------------------------------------------


def sample_params() -> dict:
    return validate_params(tiny_params())


def test_model_card_names_the_val_set_and_holds_the_metrics():
    params = sample_params()
    metrics = {
        "pixel_accuracy": 0.9584,
        "mean_class_accuracy": 0.6815,
        "mean_iou": 0.5272,
        "fw_iou": 0.9455,
        "mean_dice": 0.6123,
    }
    report = {
        "device": "cpu",
        "precision": "fp32",
        "batch_size": 1,
        "machine": "Some CPU (2 cores), torch x, 2 threads",
        "warmup": 1,
        "repeats": 3,
        "parameters": 2239207,
        "gflops_500x500": 6.98,
        "at_500x500": {"images_per_s": 1.9, "latency_p50_ms": 528.0, "latency_p95_ms": 542.3},
        "at_val_sizes": None,
        "peak_memory_mib": 78.7,
        "peak_memory_method": "cpu: psutil RSS",
    }
    val_set = scored_set_name(params)
    card = model_card("fcn8s", card_recipe(params), metrics, report, val_set)
    assert "generated sample's val split" in val_set
    assert f"## Metrics in % on {val_set}\n" in card
    assert "| pixel acc. | mean acc. | mean IU | f.w. IU | mean Dice (F1) |" in card
    assert "| 95.8 | 68.2 | 52.7 | 94.5 | 61.2 |" in card
    assert "FCN-16s (models/fcn16s.pt)" in card  # fcn8s starts from fcn16s
    assert "| 500x500 | 1.90 | 528.0 | 542.3 |" in card
    assert "2,239,207 parameters" in card and "6.98 GFLOPs" in card
    assert "generated data" in card and "PASCAL VOC 2012 val" not in card
    stage = params["train"]["fcn8s"]
    assert f"| epochs | {stage['epochs']} |" in card
    assert f"learning rate | {stage['lr']:g} (poly policy)" in card
    stage["max_iter"] = 1000  # an iteration budget replaces the epochs in the card
    card = model_card("fcn8s", card_recipe(params), metrics, report, val_set)
    assert "| iterations | 1000 (max_iter" in card and "| epochs |" not in card
    full = profile_params("full")
    metrics.pop("mean_dice")
    card = model_card("fcn32s", card_recipe(full), metrics, report, scored_set_name(full))
    assert "## Metrics in % on PASCAL VOC 2012 val\n" in card and "Dice" not in card
    assert "ImageNet VGG16" in card and "generated" not in card
    assert "| upsampling | bilinear 32x, fixed |" in card
    paper = profile_params("paper")
    card = model_card("fcn8s", card_recipe(paper), metrics, report, scored_set_name(paper))
    assert "| upsampling | every layer fixed at bilinear (the release's lr_mult 0) |" in card


# --- params and stages -----------------------------------------------------------------------


def test_params_without_the_new_sections_get_defaults():
    raw = tiny_params()
    del raw["inference"], raw["export"]
    cfg = validate_params(raw)
    assert cfg["inference"] == {"warmup": 1, "repeats": 3, "val_images": 2}
    assert cfg["export"]["min_agreement"] == 0.999


@pytest.mark.parametrize("stage", ["inference_report", "export_onnx"])
def test_stage_help(stage: str):
    p = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "--params" in p.stdout and "DVC stage" in p.stdout


def _stage_repo(tmp_path: Path, val_dir: Path) -> Path:
    write_tiny_params(
        tmp_path / "params.yaml",
        {
            "inference": {"warmup": 0, "repeats": 2, "val_images": 1},
            "export.val_images": 1,
            "evaluate.device": "cpu",
        },
    )
    for name in CASCADE:
        fcn.save_model(tmp_path / "models" / f"{name}.pt", tiny(name))
        metrics = {"pixel_accuracy": 0.5, "mean_class_accuracy": 0.25, "mean_iou": 0.125}
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps({**metrics, "fw_iou": 0.4}))
    return tmp_path


def test_inference_report_stage_writes_metrics_and_cards(tmp_path, generated_val_dir, one_thread):
    from stages import inference_report

    root = _stage_repo(tmp_path, generated_val_dir)
    args = ["--params", str(root / "params.yaml"), "--models", str(root / "models")]
    args += ["--data", str(generated_val_dir), "--out", str(root), "--only", "fcn32s", "fcn8s"]
    assert inference_report.main(args) == 0
    # the DVC metrics: one number per model, images/s at 500x500; the details are a report
    headline = json.loads((root / "metrics" / "inference.json").read_text())
    assert list(headline) == ["fcn32s", "fcn8s"]
    for name in ("fcn32s", "fcn8s"):
        r = json.loads((root / "reports" / "inference" / f"{name}.json").read_text())
        assert r["at_500x500"]["images_per_s"] > 0 and r["at_val_sizes"]["images"] == 1
        assert headline[name] == round(r["at_500x500"]["images_per_s"], 2)
        card = (root / "reports" / "model_cards" / f"{name}.md").read_text()
        assert "| 50.0 | 25.0 | 12.5 | 40.0 |" in card and "generated sample's val split" in card
        assert f"reports/inference/{name}.json holds them" in card
    assert not (root / "reports" / "inference" / "fcn16s.json").exists()
    assert not (root / "metrics" / "inference").exists()


def test_inference_report_stage_names_missing_metrics(tmp_path, generated_val_dir, capsys):
    from stages import inference_report

    root = _stage_repo(tmp_path, generated_val_dir)
    (root / "metrics" / "fcn16s.json").unlink()
    args = ["--params", str(root / "params.yaml"), "--models", str(root / "models")]
    assert inference_report.main([*args, "--data", str(generated_val_dir), "--out", str(root)]) == 1
    assert (
        "fcn16s.json: metrics not found (made by the DVC stage evaluate" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_export_onnx_stage_end_to_end(tmp_path, generated_val_dir):
    import_or_skip("onnxruntime")
    from stages import export_onnx

    root = _stage_repo(tmp_path, generated_val_dir)
    args = ["--params", str(root / "params.yaml"), "--models", str(root / "models")]
    args += ["--data", str(generated_val_dir), "--onnx", str(root / "onnx")]
    args += ["--report", str(root / "reports" / "onnx_check.json")]
    assert export_onnx.main(args) == 0
    report = json.loads((root / "reports" / "onnx_check.json").read_text())
    assert report["exporter"].startswith("torch.onnx.export") and report["opset"] == 18
    for name in CASCADE:
        assert (root / "onnx" / f"{name}.onnx").stat().st_size > 10_000
        assert report[name]["min_argmax_agreement"] >= 0.999
        assert len(report[name]["checks"]) == 3  # two random sizes + one val image
