"""params.yaml mistakes are rejected before any work starts, with the key's path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    PROFILES,
    ParamsError,
    architecture,
    initialised_from,
    load_params,
    validate_params,
)
from pipeline.training.recipe import StageRecipe, TrainConfig, model_config, train_config


@pytest.fixture
def params(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as e:
        validate_params(params)
    return str(e.value)


def test_shipped_params_are_valid_in_every_profile(params):
    for profile in PROFILES:
        p = copy.deepcopy(params)
        p["profile"] = profile
        cfg = validate_params(p)
        assert cfg is p[profile]


def test_load_params_returns_active_profile(repo_root):
    cfg = load_params(repo_root / "params.yaml")
    assert cfg["profile"] == "sample"
    assert cfg["model"]["width"] < 1  # the sample trains a width-reduced VGG16 on CPU


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p["sample"]["train"].update(lr_typo=1), "sample.train.lr_typo: unknown key"),
        (
            lambda p: p["sample"]["train"]["fcn8s"].update(lr=-0.1),
            "sample.train.fcn8s.lr: must be > 0",
        ),
        (
            lambda p: p["sample"]["train"]["fcn8s"].update(lr="fast"),
            "sample.train.fcn8s.lr: expected float",
        ),
        (
            lambda p: p["sample"]["train"].update(batch_size=2.5),
            "sample.train.batch_size: expected int",
        ),
        (
            lambda p: p["sample"]["train"].update(crop_size=16),
            "sample.train.crop_size: must be >= 32",
        ),
        (
            lambda p: p["sample"]["train"].update(precision="fp8"),
            "sample.train.precision: 'fp8' is not one of",
        ),
        (lambda p: p["full"]["train"].update(momentum=1.0), "full.train.momentum: must be < 1"),
        (lambda p: p.update(profile="huge"), "profile: 'huge' is not one of"),
        (lambda p: p["sample"]["model"].update(width=0), "sample.model.width: must be > 0"),
        (
            lambda p: p["sample"]["model"].update(backbone_init="resnet"),
            "sample.model.backbone_init",
        ),
        (lambda p: p["sample"]["coco_to_voc"].update(splits=["test2017"]), "unknown split"),
        (lambda p: p["full"]["download"]["voc"].update(urls=["ftp://x/VOC.tar"]), "scheme 'ftp'"),
        (
            lambda p: p["full"]["download"]["voc"].update(urls=[]),
            "full.download.voc.urls: no source",
        ),
        (lambda p: p["sample"]["train"].update(scale_range=[2.0, 1.0]), "sample.train.scale_range"),
        (lambda p: p["sample"].pop("evaluate"), "sample.evaluate: missing"),
        (lambda p: p["sample"]["train"].update(hflip="yes"), "sample.train.hflip: expected bool"),
        (
            lambda p: p["full"]["download"]["voc"].update(md5="6cd6e1"),
            "full.download.voc.md5: expected 32 hex",
        ),
        (
            lambda p: p["full"]["download"]["vgg16"].update(sha256_prefix="xyz"),
            "sha256_prefix: expected",
        ),
        (
            lambda p: p["full"]["train"].update(nnodes=2),
            "full.train.rdzv_endpoint: must be set (HOST:PORT of node 0) when train.nnodes is 2",
        ),
        (
            lambda p: p["full"]["train"].update(nnodes=2, node_rank=2, rdzv_endpoint="n0:29400"),
            "full.train.node_rank: 2 is not below train.nnodes 2",
        ),
        (
            lambda p: p["full"]["train"].update(rdzv_endpoint="node0"),
            "full.train.rdzv_endpoint: expected HOST:PORT",
        ),
        (lambda p: p["sample"]["train"].update(compile="yes"), "sample.train.compile: expected"),
        (
            lambda p: p["full"]["train"]["fcn32s"].update(max_iter=0),
            "full.train.fcn32s.max_iter: must be >= 1",
        ),
    ],
)
def test_mistakes_are_rejected_with_the_key_path(params, mutate, expected):
    mutate(params)
    assert expected in _error(params)


def test_all_problems_are_reported_at_once(params):
    params["sample"]["train"]["fcn8s"]["lr"] = -1
    params["sample"]["train"]["epochs"] = 3
    msg = _error(params)
    assert "2 problem(s)" in msg
    assert "sample.train.fcn8s.lr" in msg and "sample.train.epochs: unknown key" in msg


@pytest.mark.parametrize("bad", [0, -1, "ten", None])
def test_score_lr_mult_must_be_a_positive_number(params, bad):
    params["sample"]["train"]["score_lr_mult"] = bad
    assert "sample.train.score_lr_mult" in _error(params)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_yaml12_exponent_floats_as_dvc_writes_them(repo_root, tmp_path):
    # `dvc exp run -S full.train.fcn32s.lr=1e-10` writes `lr: 1e-10` (no dot): still a float
    text = (repo_root / "params.yaml").read_text().replace("lr: 1.0e-10", "lr: 1e-10")
    assert "lr: 1e-10" in text
    (tmp_path / "params.yaml").write_text(text.replace("profile: sample", "profile: full"))
    cfg = load_params(tmp_path / "params.yaml")
    assert cfg["train"]["fcn32s"]["lr"] == 1e-10


def test_unquoted_all_digit_checksums_are_text(tmp_path, repo_root):
    """`dvc exp run -S ...sha256_prefix=01234567` writes the digits unquoted: YAML would read an
    int (losing the leading zero) or, for `12e45678`, a float. The text as written is kept."""
    text = (repo_root / "params.yaml").read_text()
    for prefix in ("01234567", "12345678", "12e45678"):
        lines = [
            f"{ln.split(':')[0]}: {prefix}" if ln.strip().startswith("sha256_prefix:") else ln
            for ln in text.splitlines()
        ]
        path = tmp_path / "params.yaml"
        path.write_text("\n".join(lines) + "\n")
        assert load_params(path)["download"]["vgg16"]["sha256_prefix"] == prefix
    # an int from another writer is its decimal text
    params = yaml.safe_load(text)
    params["sample"]["download"]["vgg16"]["sha256_prefix"] = 12345678
    params["profile"] = "sample"
    assert validate_params(params)["download"]["vgg16"]["sha256_prefix"] == "12345678"


def test_launch_and_compile_keys_are_optional_with_single_node_defaults(params):
    """A params file written before these keys existed loads as one node, uncompiled."""
    for key in ("nnodes", "node_rank", "rdzv_endpoint", "compile"):
        del params["sample"]["train"][key]
    train = validate_params(params)["train"]
    assert (train["nnodes"], train["node_rank"], train["rdzv_endpoint"]) == (1, 0, None)
    assert train["compile"] is False
    params["sample"]["train"].update(nnodes=2, node_rank=1, rdzv_endpoint="[fd00::1]:29400")
    assert validate_params(params)["train"]["nnodes"] == 2


def test_max_iter_is_optional_and_null_means_epochs(params):
    """A stage without max_iter (params written before it existed) trains by epochs."""
    train = validate_params(params)["train"]
    assert all(train[m]["max_iter"] is None for m in ("fcn32s", "fcn16s", "fcn8s"))
    params["sample"]["train"]["fcn8s"]["max_iter"] = 100_000
    assert validate_params(params)["train"]["fcn8s"]["max_iter"] == 100_000


@pytest.mark.parametrize("split", ["voc2012_val", "seg11valid"])
@pytest.mark.parametrize("sbd", [None, "train", "train_noval"])
@pytest.mark.parametrize("voc_train", [True, False])
def test_every_training_source_and_split_is_allowed_or_refused_as_documented(
    params, voc_train, sbd, split
):
    """SBD train holds most of VOC 2012 val: that pair is refused, naming both remedies.
    train_noval (VOC 2012 val's images excluded by preprocess) and seg11valid (disjoint from
    SBD train by construction) are allowed; VOC 2012 train is disjoint from both splits."""
    p = params["sample"]
    p["preprocess"].update(voc_train=voc_train, sbd=sbd, use_coco=False)
    p["evaluate"]["split"] = split
    if not voc_train and sbd is None:
        assert "no training source" in _error(params)
    elif sbd == "train" and split == "voc2012_val":
        message = _error(params)
        assert "sample.preprocess.sbd" in message
        assert "train_noval" in message and "seg11valid" in message
    else:
        assert validate_params(params)["preprocess"]["sbd"] == sbd


def test_source_keys_are_optional_and_default_to_the_old_behaviour(params):
    """Params written before SBD existed: VOC train (+ COCO), no SBD, the whole split scored."""
    for key in ("voc_train", "sbd"):
        del params["sample"]["preprocess"][key]
    del params["sample"]["evaluate"]["allow_partial_split"]
    cfg = validate_params(params)
    assert (cfg["preprocess"]["voc_train"], cfg["preprocess"]["sbd"]) == (True, None)
    assert cfg["evaluate"]["allow_partial_split"] is False


def test_paper_profile_is_the_released_solvers_protocol(params):
    """The `paper` profile: SBD train alone, seg11valid, batch 1, summed loss, momentum 0.99,
    fixed lr 1e-10 / 1e-12 / 1e-14, 100k iterations per stage (voc-fcn*s/solver.prototxt)."""
    params["profile"] = "paper"
    cfg = validate_params(params)
    pre, t = cfg["preprocess"], cfg["train"]
    assert (pre["voc_train"], pre["sbd"], pre["use_coco"]) == (False, "train", False)
    assert cfg["evaluate"]["split"] == "seg11valid"
    assert (t["batch_size"], t["accumulate"], t["nproc"], t["loss"]) == (1, 1, 1, "sum")
    assert (t["momentum"], t["lr_policy"]) == (0.99, "fixed")
    assert t["score_lr_mult"] == 1  # the release's score layers learn at the net's rate
    lrs = {m: t[m]["lr"] for m in ("fcn32s", "fcn16s", "fcn8s")}
    assert lrs == {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}
    assert all(t[m]["max_iter"] == 100_000 for m in lrs)
    assert not cfg["download"]["generate_sample"] and cfg["download"]["sbd"]["urls"]


def test_at_once_fcn8s_starts_from_vgg16_instead_of_fcn16s(params):
    train = validate_params(params)["train"]
    assert train["fcn8s"]["at_once"] is False  # optional, off: the staged cascade
    assert [initialised_from(m, train) for m in ("fcn32s", "fcn16s", "fcn8s")] == [
        None,
        "fcn32s",
        "fcn16s",
    ]
    train["fcn8s"]["at_once"] = True
    assert (architecture("fcn8s", train), initialised_from("fcn8s", train)) == (
        "fcn8s_atonce",
        None,
    )
    params["sample"]["train"]["fcn16s"]["at_once"] = True  # FCN-8s only
    assert "sample.train.fcn16s.at_once: unknown key" in _error(params)


def test_train_config_is_the_validated_train_section_typed(params):
    """One typed field per key, the schema's defaults for keys a file leaves out, the stage
    recipes by name; the dict `load_params` returns is left as it was."""
    for key in ("nnodes", "node_rank", "rdzv_endpoint", "compile", "score_lr_mult"):
        params["sample"]["train"].pop(key, None)
    params["sample"]["train"]["fcn8s"].pop("max_iter", None)
    cfg = validate_params(params)
    tc = train_config(cfg)
    assert isinstance(tc, TrainConfig)
    assert (tc.nnodes, tc.node_rank, tc.rdzv_endpoint, tc.compile) == (1, 0, None, False)
    assert tc.score_lr_mult == 1.0 and tc.processes == tc.nproc
    assert tc.scale_range == tuple(cfg["train"]["scale_range"])
    assert tc.stages["fcn8s"] == StageRecipe(
        "fcn8s", cfg["train"]["fcn8s"]["epochs"], cfg["train"]["fcn8s"]["lr"], None, False
    )
    assert tc.stages["fcn16s"].architecture == "fcn16s"
    assert model_config(cfg).width == cfg["model"]["width"]
    with pytest.raises(AttributeError):
        tc.seed = 1  # frozen


def test_train_config_checks_a_hand_made_section_like_the_file(params):
    """A section edited after loading (tests, benchmarks) is checked again: the same messages,
    from the same checks, as params.yaml gets."""
    cfg = validate_params(params)
    cfg["train"].update(nnodes=2)
    with pytest.raises(ParamsError, match="train.rdzv_endpoint: must be set"):
        train_config(cfg)
    cfg["train"].update(nnodes=1, crop_size=16)
    with pytest.raises(ParamsError, match="train.crop_size: must be >= 32"):
        train_config(cfg)
    cfg["train"].update(crop_size=64, momentum=1.0)
    with pytest.raises(ParamsError, match="train.momentum: must be < 1"):
        train_config(cfg)
