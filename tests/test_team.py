"""Team workflows as the README's "Working as a team" shows them, through the real CLIs.

One small sample pipeline is reproduced once for the module, committed, pushed to a DVC remote
(a directory) and to a bare git repo that stands for the team's git server. Each test then works
in its own clone or copy: model artifacts fetched by name, an S3 remote on a real S3-compatible
server (moto's, on 127.0.0.1), a read-only HTTP remote, experiments shared through git,
`dvc repro --pull --allow-missing` in a fresh clone, and the review report script.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipeline.config import CASCADE
from tests.repo_utils import ALL_STAGES, REPO, run, set_params, stages_run

pytestmark = pytest.mark.slow

REVIEW_SCRIPT = REPO / "scripts" / "review_report.sh"


@dataclass(frozen=True)
class Team:
    repo: Path  # the first engineer's repo: reproduced, committed, pushed everywhere
    origin: Path  # bare git repo standing for the team's git server
    remote: Path  # the team's DVC remote (a directory), filled by `dvc push`


@pytest.fixture(scope="module")
def team(tmp_path_factory, sample_run) -> Team:
    """Reproduce the small sample once, then share it through a bare git repo and a DVC remote."""
    root = tmp_path_factory.mktemp("team")
    template, out = sample_run  # the small sample, reproduced once per session (fp32)
    assert stages_run(out) == ALL_STAGES, out
    repo = root / "repo"
    shutil.copytree(template, repo, symlinks=True)
    remote = root / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], repo)
    run(["git", "commit", "-qam", "shared DVC remote"], repo)
    run(["dvc", "push"], repo)
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "push", "-q", "origin", "main"], repo)
    return Team(repo=repo, origin=origin, remote=remote)


def copy_of(team: Team, dst: Path) -> Path:
    """A private copy of the first engineer's repo (history, workspace and DVC cache)."""
    shutil.copytree(team.repo, dst, symlinks=True)
    return dst


def clone(team: Team, dst: Path) -> Path:
    """A fresh `git clone` of the team's git server: no DVC cache, no data, no models."""
    run(["git", "clone", "-q", str(team.origin), str(dst)], dst.parent)
    return dst


def md5(path: Path) -> str:
    """MD5 of a file's bytes, as DVC records it in dvc.lock."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def locked_md5(repo: Path, out: str) -> str:
    """The md5 that `repo`'s dvc.lock records for the output `out`."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for o in stage.get("outs", []):
            if o["path"] == out:
                return o["md5"]
    raise KeyError(f"{out} is no output in {repo / 'dvc.lock'}")


def data_files(repo: Path) -> list[str]:
    """DVC-managed files present in the workspace (under data/, models/, checkpoints/)."""
    found = []
    for top in ("data", "models", "checkpoints"):
        for p in sorted((repo / top).rglob("*")):
            if p.is_file() and p.name not in (".gitignore", ".gitkeep"):
                found.append(p.relative_to(repo).as_posix())
    return found


def cache_objects(repo: Path) -> int:
    """Number of objects in `repo`'s local DVC cache."""
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0


def assert_has_the_models_of(repo: Path, lock_repo: Path) -> None:
    """`repo` holds the three models, byte for byte those that `lock_repo`'s dvc.lock names."""
    for model in CASCADE:
        out = f"models/{model}.pt"
        assert md5(repo / out) == locked_md5(lock_repo, out), out


# 1. model artifacts -----------------------------------------------------------------------


def test_artifacts_are_declared_with_type_desc_and_labels(team: Team) -> None:
    from dvc.repo import Repo

    declared = yaml.safe_load((team.repo / "dvc.yaml").read_text())["artifacts"]
    assert sorted(declared) == sorted(CASCADE)
    with Repo(str(team.repo)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
    for model in CASCADE:
        art = artifacts[model]
        assert art.path == f"models/{model}.pt" and art.type == "model", art
        assert art.desc, art
        # the dataset and the profile that trained it (`${profile}` resolved from params.yaml)
        assert {"voc2012", "coco2017", "profile-sample"} <= set(art.labels), art.labels


def test_artifacts_get_downloads_a_registered_model_from_another_clone(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DVC tries Studio first; offline mode keeps it from reaching for the network
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    repo = copy_of(team, tmp_path / "repo")
    run(["gto", "register", "fcn8s", "--version", "v1.0.0"], repo)
    run(["git", "push", "-q", "origin", "fcn8s@v1.0.0"], repo)
    shown = run(["gto", "show"], repo).stdout
    assert "fcn8s" in shown and "v1.0.0" in shown, shown

    # anywhere, outside any DVC project: the model by name, from the git server's DVC remote
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = str(team.origin)
    got = run(["dvc", "artifacts", "get", url, "fcn8s"], elsewhere)
    assert "Downloaded 1 file" in got.stdout, got.stdout
    assert md5(elsewhere / "fcn8s.pt") == locked_md5(team.repo, "models/fcn8s.pt")
    pinned = ["dvc", "artifacts", "get", url, "fcn8s", "--rev", "v1.0.0", "-o", "fcn8s-v1.pt"]
    run(pinned, elsewhere)
    assert md5(elsewhere / "fcn8s-v1.pt") == md5(elsewhere / "fcn8s.pt")
    # it comes from the DVC remote (the clone DVC makes of the bare repo has no cache of its own)
    where = run(["dvc", "artifacts", "get", url, "fcn8s", "--show-url"], elsewhere).stdout
    assert str(team.remote) in where, where


# 2. S3 and read-only HTTP remotes ---------------------------------------------------------


@contextmanager
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: hundreds of lines in a failure report
    access_log = logging.getLogger("werkzeug")
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        access_log.setLevel(level)


def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AWS settings for the local server only: fake keys, no profile files, no metadata service."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_s3_remote_round_trip_through_a_local_s3_server(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    fake_aws_env(monkeypatch, tmp_path)
    alice = copy_of(team, tmp_path / "alice")
    with s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="fcn-bucket")

        # the project moves its remote to S3 (an S3-compatible server, hence endpointurl)
        run(["dvc", "remote", "remove", "team"], alice)
        run(["dvc", "remote", "add", "-d", "team", "s3://fcn-bucket/dvc-store"], alice)
        run(["dvc", "remote", "modify", "team", "endpointurl", endpoint], alice)
        run(["git", "commit", "-qam", "DVC remote on S3"], alice)
        # alice keeps her keys in the git-ignored local config, not the environment
        with monkeypatch.context() as m:
            m.delenv("AWS_ACCESS_KEY_ID")
            m.delenv("AWS_SECRET_ACCESS_KEY")
            for key in ("access_key_id", "secret_access_key"):
                run(["dvc", "remote", "modify", "--local", "team", key, "testing"], alice)
            assert "access_key_id" not in (alice / ".dvc" / "config").read_text()
            run(["dvc", "push"], alice)

        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="fcn-bucket")
        keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
        fcn8s = locked_md5(alice, "models/fcn8s.pt")
        assert f"dvc-store/files/md5/{fcn8s[:2]}/{fcn8s[2:]}" in keys, sorted(keys)[:10]

        # bob: a fresh clone, keys from the usual AWS environment variables
        bob = tmp_path / "bob"
        run(["git", "clone", "-q", str(alice), str(bob)], tmp_path)
        run(["dvc", "pull"], bob)
        status = run(["dvc", "status"], bob).stdout
        assert "up to date" in status, status
        cloud = run(["dvc", "status", "--cloud"], bob).stdout
        assert "in sync" in cloud, cloud
        again = run(["dvc", "repro"], bob)
        assert stages_run(again.stdout) == [], again.stdout
        assert_has_the_models_of(bob, team.repo)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files without a log line per request."""

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that lets clients hang up mid-response without a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # dvc-http closes some GETs once it has what it needs; anything else is still shown
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serve `directory` read-only over HTTP on 127.0.0.1; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_pull_from_a_read_only_http_remote(team: Team, tmp_path: Path) -> None:
    reader = clone(team, tmp_path / "reader")
    with http_server(team.remote) as url:
        run(["dvc", "remote", "add", "public", url], reader)
        run(["dvc", "config", "cache.type", "reflink,hardlink,copy"], reader)
        run(["dvc", "pull", "-r", "public"], reader)
    status = run(["dvc", "status"], reader).stdout
    assert "up to date" in status, status
    assert_has_the_models_of(reader, team.repo)


# 3. experiments shared through git -----------------------------------------------------------


@pytest.fixture(scope="module")
def experiment(team: Team, tmp_path_factory) -> Path:
    """Alice runs the experiment `lr-low` and pushes it: its commit to git, its models to DVC."""
    alice = copy_of(team, tmp_path_factory.mktemp("exp") / "alice")
    # only train_fcn8s is targeted: enough for a new FCN-8s model, and half the time
    args = ["dvc", "exp", "run", "-n", "lr-low", "-S", "train.fcn8s.lr=0.005", "train_fcn8s"]
    out = run(args, alice, timeout=1200)
    assert stages_run(out.stdout) == ["train_fcn8s"], out.stdout
    run(["dvc", "exp", "push", "origin", "lr-low"], alice)
    return alice


def test_exp_push_then_pull_and_apply_in_another_clone(
    team: Team, experiment: Path, tmp_path: Path
) -> None:
    refs = run(["git", "for-each-ref", "refs/exps"], team.origin).stdout
    assert "lr-low" in refs, refs

    bob = clone(team, tmp_path / "bob")
    run(["dvc", "exp", "pull", "origin", "lr-low"], bob)
    assert "lr-low" in run(["dvc", "exp", "list", "--name-only"], bob).stdout
    run(["dvc", "exp", "apply", "lr-low"], bob)
    assert yaml.safe_load((bob / "params.yaml").read_text())["train"]["fcn8s"]["lr"] == (0.005)
    # the experiment's models, FCN-8s new, the others those of main
    assert_has_the_models_of(bob, experiment)
    new = locked_md5(experiment, "models/fcn8s.pt")
    assert new != locked_md5(team.repo, "models/fcn8s.pt")
    assert "up to date" in run(["dvc", "status", "train_fcn8s"], bob).stdout


# 4. repro --pull --allow-missing ------------------------------------------------------------


def test_repro_pull_allow_missing_pulls_only_what_a_running_stage_needs(
    team: Team, tmp_path: Path
) -> None:
    carol = clone(team, tmp_path / "carol")
    # nothing changed: every stage is skipped and nothing is downloaded
    out = run(["dvc", "repro", "--pull", "--allow-missing"], carol)
    assert stages_run(out.stdout) == [], out.stdout
    assert data_files(carol) == [] and cache_objects(carol) == 0

    # an evaluate-only change: evaluate runs, pulling exactly its inputs; nothing retrains
    set_params(carol, {"evaluate.qualitative_images": 1})
    out = run(["dvc", "repro", "--pull", "--allow-missing"], carol)
    assert stages_run(out.stdout) == ["evaluate"], out.stdout
    present = data_files(carol)
    print("downloaded by `dvc repro --pull --allow-missing`:", *present, sep="\n  ")
    pulled_models = [f for f in present if f.startswith("models/")]
    assert sorted(f"models/{m}.pt" for m in CASCADE) == pulled_models, present
    assert all(f.startswith(("data/preprocessed/", "models/")) for f in present), present
    for absent in ("data/raw", "data/coco_voc", "checkpoints"):
        assert not any(f.startswith(absent) for f in present), (absent, present)
    assert any(f.startswith("data/preprocessed/val/") for f in present), present
    for model in CASCADE:  # the models pulled are main's, not retrained
        assert md5(carol / f"models/{model}.pt") == locked_md5(team.repo, f"models/{model}.pt")


def test_pull_only_the_raw_datasets_then_retrain(team: Team, tmp_path: Path) -> None:
    """README: `dvc pull download_voc download_coco download_sbd download_vgg16`, then `dvc repro`
    runs coco_to_voc onwards (the downloads are not repeated)."""
    dave = clone(team, tmp_path / "dave")
    run(["dvc", "pull", "download_voc", "download_coco", "download_sbd", "download_vgg16"], dave)
    present = data_files(dave)
    assert present and all(f.startswith("data/raw/") for f in present), present
    out = run(["dvc", "repro"], dave, timeout=1200)
    assert stages_run(out.stdout) == ALL_STAGES[ALL_STAGES.index("coco_to_voc") :], out.stdout


# 5. review report ---------------------------------------------------------------------------


def test_review_report_between_main_and_the_workspace_and_a_branch(experiment: Path) -> None:
    alice = experiment  # lr-low's results are in her workspace after `dvc exp run`
    run(["bash", str(REVIEW_SCRIPT), "main"], alice)
    review = alice / "review"
    report = (review / "report.md").read_text()
    assert "main -> workspace" in report, report
    assert "train.fcn8s.lr" in (review / "params.md").read_text()
    # only train_fcn8s ran: its training summary is an output, not a metric (the curves are in
    # the plots); the metrics, evaluation and speed, are main's
    assert "dvclive" not in (review / "metrics.md").read_text()
    for part in ("## Params", "## Metrics", "train.fcn8s.lr", "## Plots"):
        assert part in report, (part, report)
    page = (review / "plots" / "index.html").read_text()
    assert "dvclive/fcn8s/plots/metrics/train/loss.tsv" in page

    # two committed revisions (a branch made from the experiment) into another folder
    run(["dvc", "exp", "branch", "lr-low", "lr-low"], alice)
    run(["bash", str(REVIEW_SCRIPT), "main", "lr-low", "review-lr-low"], alice)
    branch_report = (alice / "review-lr-low" / "report.md").read_text()
    assert "main -> lr-low" in branch_report and "train.fcn8s.lr" in branch_report
    assert (alice / "review-lr-low" / "plots" / "index.html").is_file()

    # no change: said in words, not as an empty table
    run(["bash", str(REVIEW_SCRIPT), "main", "main", "review-none"], alice)
    same = (alice / "review-none" / "report.md").read_text()
    assert "No params changed." in same and "No metrics changed." in same, same
    bad = run(["bash", str(REVIEW_SCRIPT), "no-such-rev"], alice, check=False)
    assert bad.returncode == 2 and "no-such-rev" in bad.stderr, bad.stderr
