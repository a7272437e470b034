"""The walking pipeline and the team workflows, driven through the real `dvc` and `git` CLIs.

One small sample run (same stages and code as the default, fewer/smaller images, fewer
epochs) is reproduced once per session; each test works on its own copy of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.repo_utils import ALL_STAGES, FOUR, TINY_SAMPLE, run, set_params, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture
def run_copy(sample_run, tmp_path) -> Path:
    """A private copy of the reproduced repo (git history, outputs and DVC cache included)."""
    dst = tmp_path / "repo"
    shutil.copytree(sample_run[0], dst, symlinks=True)
    return dst


def test_repro_runs_every_stage_then_nothing(sample_run):
    repo, out = sample_run
    assert stages_run(out) == ALL_STAGES, out
    again = run(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == [], again.stdout
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout


def test_metrics_show_lists_the_four_metrics_per_model(sample_run):
    repo, _ = sample_run
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    data = next(iter(shown.values()))["data"]
    # the headline numbers only: details are plots and plain outputs (reports/), not metrics
    models = ("fcn32s", "fcn16s", "fcn8s")
    headline = {*(f"metrics/{m}.json" for m in models), "metrics/inference.json"}
    assert set(data) == {*headline, "metrics/data.json"}, sorted(data)
    for model in models:
        metrics = data[f"metrics/{model}.json"]["data"]
        assert list(metrics) == [*FOUR, "mean_dice"], (model, metrics)
        for key in metrics:
            assert 0.0 <= metrics[key] <= 1.0, (model, key, metrics)
    assert list(data["metrics/inference.json"]["data"]) == list(models)
    assert set(data["metrics/data.json"]["data"]) == {"train_images", "val_images"}
    table = run(["dvc", "metrics", "show"], repo).stdout
    assert "mean_iou" in table and "metrics/fcn8s.json" in table
    assert max(len(line) for line in table.splitlines()) <= 160, table  # fits a terminal


def test_models_are_loadable_with_weights_only(sample_run):
    import torch

    repo, _ = sample_run
    for model in ("fcn32s", "fcn16s", "fcn8s"):
        state = torch.load(repo / "models" / f"{model}.pt", weights_only=True)
        assert state["arch"] == model


def test_fcn8s_param_change_reruns_only_fcn8s_and_its_downstream(run_copy):
    repo = run_copy
    lr = TINY_SAMPLE["train.fcn8s.lr"]
    set_params(repo, {"train.fcn8s.lr": lr / 2})  # any other value
    out = run(["dvc", "repro"], repo)
    downstream = ["evaluate", "inference_report", "export_onnx"]  # all read models/fcn8s.pt
    assert stages_run(out.stdout) == ["train_fcn8s", *downstream], out.stdout
    # compare across commits: the param and the FCN-8s metrics changed, FCN-32s did not
    params = run(["dvc", "params", "diff"], repo).stdout
    assert "train.fcn8s.lr" in params, params
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    # FCN-8s' training summary changed (an output, not a metric); nothing upstream of it did.
    # (Its val scores may not: this test-sized run is too short to leave the all-background
    # optimum.)
    changed = json.loads(run(["dvc", "diff", "--json"], repo).stdout)
    modified = {entry["path"] for entry in changed["modified"]}
    assert "dvclive/fcn8s/metrics.json" in modified, changed
    for unchanged in ("fcn32s", "fcn16s"):
        assert f"metrics/{unchanged}.json" not in diff, diff
        assert f"dvclive/{unchanged}/metrics.json" not in modified, changed
    assert run(["dvc", "metrics", "diff"], repo).stdout.strip()  # readable table too
    html = repo / "plots_diff"
    run(["dvc", "plots", "diff", "HEAD", "-o", str(html)], repo)
    page = (html / "index.html").read_text()
    assert "fcn8s" in page


def test_experiments_show_params_and_metrics(run_copy):
    repo = run_copy
    # only train_fcn8s is targeted: a new experiment's params and results all the same, without
    # re-running evaluate, inference_report and export_onnx for each one
    out = run(
        ["dvc", "exp", "run", "-n", "lr-low", "-S", "train.fcn8s.lr=0.0005", "train_fcn8s"],
        repo,
    )
    assert stages_run(out.stdout) == ["train_fcn8s"], out.stdout
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    header, *rows = shown.splitlines()
    assert "lr-low" in shown
    assert "mean_iou" in header and "train.fcn8s.lr" in header, header
    # queue another one and run the queue; then branch off the first one
    run(["dvc", "exp", "run", "--queue", "-S", "train.fcn8s.lr=0.004", "train_fcn8s"], repo)
    assert "Queued" in run(["dvc", "queue", "status"], repo).stdout
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], repo, timeout=1200)
    table = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "0.004" in table, table
    run(["dvc", "exp", "branch", "lr-low", "lr-low-branch"], repo)
    assert "lr-low-branch" in run(["git", "branch"], repo).stdout


def _push_clone_pull(repo: Path, remote_url: str, clone_dir: Path, extra_config=()) -> str:
    run(["dvc", "remote", "add", "-d", "team", remote_url], repo)
    for args in extra_config:
        run(["dvc", "remote", "modify", "team", *args], repo)
    run(["git", "add", ".dvc/config"], repo)
    run(["git", "commit", "-qm", "shared remote"], repo)
    run(["dvc", "push"], repo)
    run(["git", "clone", "-q", str(repo), str(clone_dir)], clone_dir.parent)
    run(["dvc", "pull"], clone_dir)
    status = run(["dvc", "status"], clone_dir).stdout
    assert "up to date" in status, status
    again = run(["dvc", "repro"], clone_dir)
    assert stages_run(again.stdout) == [], again.stdout
    for model in ("fcn32s", "fcn16s", "fcn8s"):
        assert (clone_dir / "models" / f"{model}.pt").is_file()
        assert (clone_dir / "metrics" / f"{model}.json").is_file()
    return status


def test_push_clone_pull_to_local_remote(run_copy, tmp_path):
    _push_clone_pull(run_copy, str(tmp_path / "remote"), tmp_path / "clone")
    # pulling only the datasets, to retrain elsewhere, works too
    only = tmp_path / "datasets-only"
    run(["git", "clone", "-q", str(run_copy), str(only)], tmp_path)
    run(["dvc", "pull", "download_voc", "download_coco", "download_sbd", "download_vgg16"], only)
    assert (only / "data/raw/voc/VOCtrainval_11-May-2012.tar").is_file()
    assert not (only / "models" / "fcn8s.pt").exists()


def test_push_clone_pull_through_real_ssh_server(run_copy, tmp_path, sshd_server):
    """The teammate's flow against a real OpenSSH server on 127.0.0.1 (dvc-ssh)."""
    from tests import sshd

    server = sshd_server
    sshd.configure_ssh_remote(run_copy, "team", server, tmp_path / "ssh-remote")
    sshd.run(["dvc", "push"], run_copy, server)
    clone = tmp_path / "ssh-clone"
    sshd.run(["git", "clone", "-q", str(run_copy), str(clone)], tmp_path, server)
    sshd.run(["dvc", "pull"], clone, server)
    status = sshd.run(["dvc", "status"], clone, server).stdout
    assert "up to date" in status, status
    again = sshd.run(["dvc", "repro"], clone, server)
    assert stages_run(again.stdout) == [], again.stdout
    assert (clone / "models" / "fcn8s.pt").is_file()


def test_plots_show_renders_curves_bars_and_images(run_copy):
    out_dir = run_copy / "dvc_plots"
    run(["dvc", "plots", "show", "-o", str(out_dir)], run_copy)
    page = (out_dir / "index.html").read_text()
    # training curves of all three stages (top-level plots in dvc.yaml)
    for title in ("Training loss", "Validation mean IoU"):
        assert title in page, title
    for model in ("fcn32s", "fcn16s", "fcn8s"):
        assert f"dvclive/{model}/plots/metrics/train/loss.tsv" in page
        assert f"plots/{model}/per_class_iou.csv" in page  # the bar chart
        assert f"plots/{model}/per_image.csv" in page
        assert f"plots/{model}/confusion.csv" in page  # the confusion_counts template
        for image in ("confusion.png", "qualitative.png", "worst.png", "best.png"):
            assert f"plots/{model}/{image}" in page
    assert "bar" in page  # vega-lite bar mark of the per-class IoU template
    # the project's confusion template: counts summed per (actual, predicted) cell, not rows
    assert '"op": "sum", "field": "pixels"' in page or '"op":"sum","field":"pixels"' in page
    assert "<img" in page  # the confusion matrices and qualitative sheets are embedded
