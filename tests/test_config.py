"""params.yaml mistakes are rejected before any work starts, with the key's path."""

from __future__ import annotations

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
from tests.repo_utils import profile_params, tiny_params


@pytest.fixture
def params() -> dict:
    """The test suite's sample profile, in params.yaml's layout."""
    return tiny_params()


def _error(params: dict) -> str:
    with pytest.raises(ParamsError) as e:
        validate_params(params)
    return str(e.value)


def test_shipped_params_are_valid_in_every_profile():
    for profile in PROFILES:
        cfg = validate_params(profile_params(profile))
        assert cfg["profile"] == profile


def test_params_yaml_is_what_dvc_exp_run_composes_from_conf(repo_root: Path, tmp_path: Path):
    """`dvc exp run` rewrites params.yaml from conf/ (Hydra): the committed file must be that
    composition, byte for byte, or the first experiment would change what `dvc repro` ran."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(repo_root / "conf"), None, "config", str(repo_root), [])
    assert out.read_text() == (repo_root / "params.yaml").read_text(), (
        "params.yaml is out of step with conf/: run `dvc exp run` (or compose it as this test does)"
    )
    assert yaml.safe_load(out.read_text())["profile"] == "sample"


def test_paper_is_full_plus_the_release_differences():
    """conf/profile/paper.yaml composes over full.yaml: only the keys the release changes
    differ, every other key is full's (one place for each value)."""

    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    full, paper = flat(profile_params("full")), flat(profile_params("paper"))
    differ = {k for k in paper if full.get(k, "absent") != paper[k]}
    assert {"download.vgg16.format", "train.learn_upsampling", "evaluate.split"} <= differ
    assert "train.momentum" not in differ and "download.voc.md5" not in differ


def test_load_params_returns_active_profile(repo_root):
    cfg = load_params(repo_root / "params.yaml")
    assert cfg["profile"] == "sample"
    assert cfg["model"]["width"] < 1  # the sample trains a width-reduced VGG16 on CPU


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p["train"].update(lr_typo=1), "train.lr_typo: unknown key"),
        (
            lambda p: p["train"]["fcn8s"].update(lr=-0.1),
            "train.fcn8s.lr: must be > 0",
        ),
        (
            lambda p: p["train"]["fcn8s"].update(lr="fast"),
            "train.fcn8s.lr: expected float",
        ),
        (
            lambda p: p["train"].update(batch_size=2.5),
            "train.batch_size: expected int",
        ),
        (
            lambda p: p["train"].update(crop_size=16),
            "train.crop_size: must be >= 32",
        ),
        (
            lambda p: p["train"].update(precision="fp8"),
            "train.precision: 'fp8' is not one of",
        ),
        (lambda p: p["train"].update(momentum=1.0), "train.momentum: must be < 1"),
        (lambda p: p.update(profile="huge"), "profile: 'huge' is not one of"),
        (lambda p: p["model"].update(width=0), "model.width: must be > 0"),
        (
            lambda p: p["model"].update(backbone_init="resnet"),
            "model.backbone_init",
        ),
        (lambda p: p["coco_to_voc"].update(splits=["test2017"]), "unknown split"),
        (lambda p: p["download"]["voc"].update(urls=["ftp://x/VOC.tar"]), "scheme 'ftp'"),
        (
            lambda p: p["download"].update(generate_sample=False),
            "download.voc.urls: no source",
        ),
        (lambda p: p["train"].update(scale_range=[2.0, 1.0]), "train.scale_range"),
        (lambda p: p.pop("evaluate"), "evaluate: missing"),
        (lambda p: p["train"].update(hflip="yes"), "train.hflip: expected bool"),
        (
            lambda p: p["download"]["voc"].update(md5="6cd6e1"),
            "download.voc.md5: expected 32 hex",
        ),
        (
            lambda p: p["download"]["vgg16"].update(sha256_prefix="xyz"),
            "sha256_prefix: expected",
        ),
        (
            lambda p: p["train"].update(nnodes=2),
            "train.rdzv_endpoint: must be set (HOST:PORT of node 0) when train.nnodes is 2",
        ),
        (
            lambda p: p["train"].update(nnodes=2, node_rank=2, rdzv_endpoint="n0:29400"),
            "train.node_rank: 2 is not below train.nnodes 2",
        ),
        (
            lambda p: p["train"].update(rdzv_endpoint="node0"),
            "train.rdzv_endpoint: expected HOST:PORT",
        ),
        (lambda p: p["train"].update(compile="yes"), "train.compile: expected"),
        (
            lambda p: p["train"]["fcn32s"].update(max_iter=0),
            "train.fcn32s.max_iter: must be >= 1",
        ),
    ],
)
def test_mistakes_are_rejected_with_the_key_path(params, mutate, expected):
    mutate(params)
    assert expected in _error(params)


def test_all_problems_are_reported_at_once(params):
    params["train"]["fcn8s"]["lr"] = -1
    params["train"]["epochs"] = 3
    msg = _error(params)
    assert "2 problem(s)" in msg
    assert "train.fcn8s.lr" in msg and "train.epochs: unknown key" in msg


@pytest.mark.parametrize("bad", [0, -1, "ten", None])
def test_score_lr_mult_must_be_a_positive_number(params, bad):
    params["train"]["score_lr_mult"] = bad
    assert "train.score_lr_mult" in _error(params)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_yaml12_exponent_floats_as_dvc_writes_them(repo_root, tmp_path):
    # `dvc exp run -S train.fcn32s.lr=1e-10` writes `lr: 1e-10` (no dot): still a float
    text = yaml.safe_dump(profile_params("full")).replace("lr: 1.0e-10", "lr: 1e-10")
    assert "lr: 1e-10" in text
    (tmp_path / "params.yaml").write_text(text)
    cfg = load_params(tmp_path / "params.yaml")
    assert cfg["train"]["fcn32s"]["lr"] == 1e-10


def test_unquoted_all_digit_checksums_are_text(tmp_path, repo_root):
    """`dvc exp run -S ...sha256_prefix=01234567` writes the digits unquoted: YAML would read an
    int (losing the leading zero) or, for `12e45678`, a float. The text as written is kept."""
    text = yaml.safe_dump(profile_params("full"), sort_keys=False)
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
    params["download"]["vgg16"]["sha256_prefix"] = 12345678
    assert validate_params(params)["download"]["vgg16"]["sha256_prefix"] == "12345678"


def test_launch_and_compile_keys_are_optional_with_single_node_defaults(params):
    """A params file written before these keys existed loads as one node, uncompiled."""
    for key in ("nnodes", "node_rank", "rdzv_endpoint", "compile"):
        del params["train"][key]
    train = validate_params(params)["train"]
    assert (train["nnodes"], train["node_rank"], train["rdzv_endpoint"]) == (1, 0, None)
    assert train["compile"] is False
    params["train"].update(nnodes=2, node_rank=1, rdzv_endpoint="[fd00::1]:29400")
    assert validate_params(params)["train"]["nnodes"] == 2


def test_max_iter_is_optional_and_null_means_epochs(params):
    """A stage without max_iter (params written before it existed) trains by epochs."""
    train = validate_params(params)["train"]
    assert all(train[m]["max_iter"] is None for m in ("fcn32s", "fcn16s", "fcn8s"))
    params["train"]["fcn8s"]["max_iter"] = 100_000
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
    p = params
    p["preprocess"].update(voc_train=voc_train, sbd=sbd, use_coco=False)
    p["evaluate"]["split"] = split
    if not voc_train and sbd is None:
        assert "no training source" in _error(params)
    elif sbd == "train" and split == "voc2012_val":
        message = _error(params)
        assert "preprocess.sbd" in message
        assert "train_noval" in message and "seg11valid" in message
    else:
        assert validate_params(params)["preprocess"]["sbd"] == sbd


def test_source_keys_are_optional_and_default_to_the_old_behaviour(params):
    """Params written before SBD existed: VOC train (+ COCO), no SBD, the whole split scored."""
    for key in ("voc_train", "sbd"):
        del params["preprocess"][key]
    del params["evaluate"]["allow_partial_split"]
    cfg = validate_params(params)
    assert (cfg["preprocess"]["voc_train"], cfg["preprocess"]["sbd"]) == (True, None)
    assert cfg["evaluate"]["allow_partial_split"] is False


def test_paper_profile_is_the_released_solvers_protocol():
    """The `paper` profile: SBD train alone, seg11valid, batch 1, summed loss, momentum 0.99,
    fixed lr 1e-10 / 1e-12 / 1e-14, 100k iterations per stage (voc-fcn*s/solver.prototxt),
    from the Caffe VGG16 on its own input, every upsampling fixed (lr_mult 0)."""
    cfg = validate_params(profile_params("paper"))
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
    assert cfg["download"]["vgg16"]["format"] == "caffe" and t["learn_upsampling"] is False


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
    params["train"]["fcn16s"]["at_once"] = True  # FCN-8s only
    assert "train.fcn16s.at_once: unknown key" in _error(params)


def test_train_config_is_the_validated_train_section_typed(params):
    """One typed field per key, the schema's defaults for keys a file leaves out, the stage
    recipes by name; the dict `load_params` returns is left as it was."""
    for key in ("nnodes", "node_rank", "rdzv_endpoint", "compile", "score_lr_mult"):
        params["train"].pop(key, None)
    params["train"]["fcn8s"].pop("max_iter", None)
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


def _keys(schema: dict) -> dict:
    return {k: _keys(v) if isinstance(v, dict) else None for k, v in schema.items()}


def test_every_section_has_a_frozen_typed_view_with_exactly_the_schema_keys():
    import dataclasses

    from pipeline.config import CASCADE, SCHEMA
    from pipeline.data.settings import (
        CocoToVocConfig,
        DownloadConfig,
        PreprocessConfig,
        coco_to_voc_config,
        download_config,
        preprocess_config,
    )
    from pipeline.evaluation.settings import EvaluateConfig, evaluate_config
    from pipeline.inference.settings import (
        ExportConfig,
        InferenceConfig,
        export_config,
        inference_config,
    )
    from pipeline.sections import schema_keys
    from pipeline.training.recipe import ModelConfig, TrainConfig, model_config, train_config

    views = {
        "download": (DownloadConfig, download_config),
        "coco_to_voc": (CocoToVocConfig, coco_to_voc_config),
        "preprocess": (PreprocessConfig, preprocess_config),
        "model": (ModelConfig, model_config),
        "evaluate": (EvaluateConfig, evaluate_config),
        "inference": (InferenceConfig, inference_config),
        "export": (ExportConfig, export_config),
    }
    assert set(views) | {"train"} == set(SCHEMA)
    for section, (cls, _) in views.items():
        assert schema_keys(cls) == _keys(SCHEMA[section]), section
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stages"}
    assert train_fields == set(SCHEMA["train"]) - set(CASCADE)

    for profile in ("sample", "full", "paper"):
        cfg = validate_params(profile_params(profile))
        for cls, view in views.values():
            typed = view(cfg)
            assert isinstance(typed, cls)
            first = dataclasses.fields(cls)[0].name
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(typed, first, None)
        download = download_config(cfg)
        assert isinstance(download.voc.urls, tuple) and download.voc.urls == tuple(
            cfg["download"]["voc"]["urls"]
        )
        assert download.vgg16.pretrain.epochs == cfg["download"]["vgg16"]["pretrain"]["epochs"]
        assert evaluate_config(cfg).tta.scales == tuple(cfg["evaluate"]["tta"]["scales"])
        assert train_config(cfg).stages["fcn8s"].lr == cfg["train"]["fcn8s"]["lr"]


def test_a_section_view_names_the_bad_key():
    from pipeline.data.settings import preprocess_config

    cfg = profile_params("sample")
    cfg["preprocess"]["max_size"] = 8
    with pytest.raises(ParamsError, match=r"preprocess\.max_size: must be >= 32"):
        preprocess_config(cfg)
