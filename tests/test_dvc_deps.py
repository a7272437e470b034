"""dvc.yaml's `deps` lists against the code each stage runs.

A stage whose `cmd` runs `python -m stages.X` (or `python stages/X.py`) runs the import closure
of that module within the project: every module of `stages/` and `pipeline/` it imports,
directly or not, at the top of a file or inside a function, with the package `__init__.py`
files those imports execute, and the data files next to them that the code opens. DVC re-runs a
stage only when one of its deps changes, so the closure must be covered by the deps (a file, or
a directory that holds it), and no code outside the closure may be listed (it would re-run the
stage for nothing). The closure is computed with `ast`, nothing is imported; the stages and
their deps are DVC's own (`Repo.index.stages`), templating resolved.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "pipeline")  # the project's code; everything else is a third party's
_RUN_MODULE = re.compile(r"^python3?$")


def module_path(name: str, root: Path = REPO) -> Path | None:
    """The file of project module `name` (`pipeline.data.sample`), or None: not the project's."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every module name an import statement of one module may execute (anywhere in it: in
    functions too), but not those under `if TYPE_CHECKING:`, which never run."""

    def __init__(self, name: str, is_package: bool):
        self.package = name if is_package else name.rpartition(".")[0]
        self.names: set[str] = set()

    def _add(self, dotted: str) -> None:
        parts = dotted.split(".")
        # `import a.b.c` executes a/__init__.py and a/b/__init__.py before a/b/c.py
        self.names.update(".".join(parts[: i + 1]) for i in range(len(parts)))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the module's own package, `level - 1` packages up
            base_parts = self.package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(p for p in [*base_parts, node.module or ""] if p)
        else:
            base = node.module or ""
        self._add(base)
        for alias in node.names:  # `from pipeline.data import sample` imports a module
            self.names.add(f"{base}.{alias.name}")


@cache
def _direct_imports(path: Path, name: str) -> frozenset[str]:
    visitor = _Imports(name, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return frozenset(visitor.names)


def _data_files(path: Path) -> set[Path]:
    """Files beside `path` that it names in a string literal (`Path(__file__).with_name(
    "seg11valid.txt")`): data the code reads, which changes the stage's result like code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text and "/" not in text and "\n" not in text and not text.startswith("."):
                candidate = path.parent / text
                if candidate.suffix != ".py" and candidate.is_file():
                    found.add(candidate)
    return found


def closure(entry: str, as_module: bool = True, root: Path = REPO) -> set[Path]:
    """The project files `python -m <entry>` (or, `as_module=False`, `python <entry's file>`)
    executes or reads: modules, package `__init__.py` files and the data files they name."""
    names = {entry}
    if as_module:  # -m imports the packages above the module first
        parts = entry.split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts) - 1))
    todo, files = list(names), set()
    seen = set(names)
    while todo:
        name = todo.pop()
        path = module_path(name, root)
        if path is None:
            continue
        files.add(path)
        for new in _direct_imports(path, name) - seen:
            seen.add(new)
            todo.append(new)
    for path in list(files):
        files |= _data_files(path)
    return files


def entry_module(cmd: str) -> tuple[str, bool] | None:
    """(`stages.X`, run with -m?) of a stage command that runs a project stage module."""
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        if not _RUN_MODULE.match(Path(word).name):
            continue
        rest = words[i + 1 :]
        if len(rest) >= 2 and rest[0] == "-m" and rest[1].split(".")[0] == "stages":
            return rest[1], True
        if rest and rest[0].startswith("stages/") and rest[0].endswith(".py"):
            return rest[0][: -len(".py")].replace("/", "."), False
    return None


def _rel(path: str | Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def code_stages(root: Path = REPO) -> list[tuple[str, str, bool, list[str]]]:
    """(stage name, entry module, run with -m?, deps) of every stage of `root`'s dvc.yaml that
    runs a project module, as DVC resolves it (active profile). `deps`: the file and directory
    deps relative to `root`, less those that some stage writes (data, models)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        outs = [_rel(out.fs_path, root) for stage in stages for out in stage.outs]
        found = []
        for stage in stages:
            entry = entry_module(stage.cmd) if getattr(stage, "cmd", None) else None
            if entry is None:
                continue
            deps = [
                _rel(dep.fs_path, root)
                for dep in stage.deps
                if not isinstance(dep, ParamsDependency)
            ]
            found.append((stage.name, *entry, [d for d in deps if not _covered(d, outs)]))
    return found


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def dep_files(dep: str, root: Path = REPO) -> list[str]:
    """The files DVC hashes for a dep (the file, or each file of a directory, followed through
    symlinks as DVC reads them), relative to `root`."""
    path = root / dep
    if not path.is_dir():
        return [_rel(path.resolve(), root)] if path.exists() else []
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        files += [
            _rel((Path(dirpath) / f).resolve(), root) for f in filenames if not f.endswith(".pyc")
        ]
    return sorted(files)


def _is_code(rel: str) -> bool:
    return rel.split("/")[0] in PACKAGES


def dependency_problems(root: Path = REPO) -> dict[str, list[str]]:
    """{stage: what is wrong with its deps}: closure files it does not list, listed code it
    does not run. Empty when every stage's deps are exactly the code it runs."""
    problems: dict[str, list[str]] = {}
    for name, entry, as_module, deps in code_stages(root):
        needed = {_rel(p, root) for p in closure(entry, as_module, root)}
        listed = {dep: dep_files(dep, root) for dep in deps}
        have = {f for files in listed.values() for f in files}
        linked = [dep for dep in deps if dep.split("/")[0] == CODE_DEPS]
        how = (
            f"link it into {linked[0]} (`python tests/test_dvc_deps.py` does)"
            if linked
            else "add it to the stage's deps in dvc.yaml"
        )
        out = [
            f"`{name}` runs `{entry}`, which uses {path}; {how}" for path in sorted(needed - have)
        ]
        for dep, files in listed.items():
            extra = [f for f in files if _is_code(f) and f not in needed]
            if extra:
                out.append(
                    f"`{name}` lists {dep} in its deps, but `{entry}` never uses "
                    f"{', '.join(extra)}: remove it (or list only the files it runs)"
                )
        if out:
            problems[name] = out
    return problems


# --- code deps that only some profiles have ------------------------------------------------
# DVC cannot choose a stage's deps by a param (no nested `${${profile}...}`, no list-valued
# interpolation in `deps`), but `${profile}` can choose a path. The download stages depend on
# code-deps/${profile}/download: for a profile that generates its inputs
# (`download.generate_sample`) a directory of symlinks to the code `stages.download` runs, so
# an edit of the generator re-makes the archives; for the others, whose files are pinned by
# checksum, a README and no code, so no code edit re-downloads them.

CODE_DEPS = "code-deps"
NO_CODE = (
    "The downloads of this profile are pinned by checksum: they depend on no code, so that no\n"
    "edit re-downloads them. Symlinks here would make the download stages follow that code.\n"
)


def _profiles(root: Path) -> dict[str, dict]:
    """Every profile of `root`/conf, as Hydra composes it."""
    from pipeline.config import PROFILES
    from tests.repo_utils import profile_params

    return {name: profile_params(name, root) for name in PROFILES}


def expected_code_deps(root: Path = REPO) -> dict[str, dict[str, str | None]]:
    """{code-deps/<profile>/<name>: {file: symlink target or None for a README}} for every
    code-deps directory the stages of the active profile name, in every profile."""
    profiles = _profiles(root)
    want: dict[str, dict[str, str | None]] = {}
    for _, entry, as_module, deps in code_stages(root):
        for dep in deps:
            parts = dep.split("/")
            if parts[0] != CODE_DEPS:
                continue
            name = "/".join(parts[2:])
            files = sorted(_rel(p, root) for p in closure(entry, as_module, root))
            for profile, section in profiles.items():
                where = f"{CODE_DEPS}/{profile}/{name}"
                if section.get("download", {}).get("generate_sample"):
                    want[where] = {f: f for f in files}
                else:
                    want[where] = {"README": None}
    return want


def actual_code_deps(where: str, root: Path = REPO) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    base = root / where
    for dirpath, _, filenames in os.walk(base):
        for f in filenames:
            path = Path(dirpath) / f
            rel = _rel(path, base)
            found[rel] = _rel(path.resolve(), root) if path.is_symlink() else None
    return found


def sync_code_deps(root: Path = REPO) -> None:
    """Make every code-deps directory what `expected_code_deps` says (relative symlinks)."""
    import shutil

    for where, files in expected_code_deps(root).items():
        base = root / where
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        for rel, target in files.items():
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if target is None:
                path.write_text(NO_CODE)
            else:
                path.symlink_to(os.path.relpath(root / target, path.parent))


# --- the analysis itself, on a small made-up project ----------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_every_kind_of_import(tmp_path):
    _write(
        tmp_path,
        {
            "stages/__init__.py": "",
            "stages/run.py": (
                "import os\n"
                "from pipeline.a import f\n"
                "def main():\n"
                "    from pipeline.pkg import mod\n"  # a module through `from package import`
                "    import pipeline.deep.leaf\n"  # executes pipeline/deep/__init__.py too
            ),
            "pipeline/__init__.py": "",
            "pipeline/a.py": (
                "from typing import TYPE_CHECKING\n"
                "from pipeline import b\n"
                "if TYPE_CHECKING:\n"
                "    from pipeline.typing_only import T\n"  # never runs
                "from pathlib import Path\n"
                "LIST = Path(__file__).with_name('list.txt')\n"  # data read by the code
            ),
            "pipeline/list.txt": "x\n",
            "pipeline/b.py": "",
            "pipeline/typing_only.py": "",
            "pipeline/unused.py": "",
            "pipeline/pkg/__init__.py": "",
            "pipeline/pkg/mod.py": "from ..b import x\n",  # relative: pipeline/b.py
            "pipeline/deep/__init__.py": "",
            "pipeline/deep/leaf.py": "",
        },
    )
    got = {_rel(p, tmp_path) for p in closure("stages.run", root=tmp_path)}
    assert got == {
        "stages/__init__.py",
        "stages/run.py",
        "pipeline/__init__.py",
        "pipeline/a.py",
        "pipeline/list.txt",
        "pipeline/b.py",
        "pipeline/pkg/__init__.py",
        "pipeline/pkg/mod.py",
        "pipeline/deep/__init__.py",
        "pipeline/deep/leaf.py",
    }
    as_script = {_rel(p, tmp_path) for p in closure("stages.run", False, tmp_path)}
    assert as_script == got - {"stages/__init__.py"}  # `python stages/run.py`: no package


def test_entry_module_reads_the_stage_commands():
    assert entry_module("python -m stages.download voc") == ("stages.download", True)
    assert entry_module("exec python -m stages.train fcn32s") == ("stages.train", True)
    assert entry_module("python stages/evaluate.py --x") == ("stages.evaluate", False)
    assert entry_module("python -m pytest") is None
    assert entry_module("echo stages/x.py") is None


# --- the project's dvc.yaml ----------------------------------------------------------------


def test_dvc_yaml_has_stages_that_run_project_code():
    names = [name for name, *_ in code_stages()]
    assert names, "no stage of dvc.yaml runs `python -m stages.X`: the parsing is broken"


def test_every_stage_depends_on_exactly_the_code_it_runs():
    problems = dependency_problems()
    assert not problems, "dvc.yaml deps out of step with the code:\n" + "\n".join(
        line for lines in problems.values() for line in lines
    )


def workspace(dst: Path, profile: str | None = None) -> Path:
    """A DVC project in `dst` with the checkout's code, dvc.yaml and params.yaml (`profile`
    made the active one) and nothing else: no data, no outputs."""
    import shutil
    import subprocess

    for item in (*PACKAGES, CODE_DEPS, "conf", "dvc.yaml", "params.yaml"):
        src = REPO / item
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(src, dst / item, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, dst / item)
    if profile is not None:  # what `dvc exp run -S profile=<profile>` composes
        from tests.repo_utils import profile_params, write_params

        write_params(dst / "params.yaml", profile_params(profile))
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q"], cwd=dst, check=True, capture_output=True)
    Repo.init(str(dst)).close()
    return dst


def _new_problems(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict:
    new = {k: [x for x in v if x not in before.get(k, [])] for k, v in after.items()}
    return {k: v for k, v in new.items() if v}


def test_a_module_left_out_of_a_stage_is_named_with_the_stage(tmp_path):
    """Drop one module from one stage's deps in a copy of the project: the check names both."""
    ws = workspace(tmp_path)
    stage, removed = next(
        (name, dep)
        for name, _, _, deps in code_stages(ws)
        for dep in deps
        if _is_code(dep) and dep.endswith(".py") and not dep.endswith("__init__.py")
    )
    before = dependency_problems(ws)  # whatever the checkout has wrong already stays so
    text = (ws / "dvc.yaml").read_text()
    block = re.search(rf"(?ms)^  {re.escape(stage)}:\n.*?(?=^  \S|\Z)", text)
    assert block, stage
    edited = re.sub(rf"(?m)^\s+- {re.escape(removed)}\s*(#.*)?\n", "", block.group(0), count=1)
    (ws / "dvc.yaml").write_text(text.replace(block.group(0), edited))
    new = _new_problems(before, dependency_problems(ws))
    assert list(new) == [stage], new
    assert any(f"`{stage}`" in line and removed in line for line in new[stage])


def test_a_module_left_out_of_code_deps_is_named_with_every_stage_it_feeds(tmp_path):
    ws = workspace(tmp_path, profile="sample")
    linked = {
        name: dep
        for name, _, _, deps in code_stages(ws)
        for dep in deps
        if dep.split("/")[0] == CODE_DEPS
    }
    assert linked, f"no stage depends on {CODE_DEPS}/"
    where = next(iter(linked.values()))
    link = next(p for p in sorted((ws / where).rglob("*.py")) if p.name != "__init__.py")
    module = _rel(link.resolve(), ws)
    before = dependency_problems(ws)
    link.unlink()
    new = _new_problems(before, dependency_problems(ws))
    assert sorted(new) == sorted(n for n, d in linked.items() if d == where), new
    for name in new:
        assert any(module in line and where in line for line in new[name]), new[name]


def test_code_deps_directories_link_exactly_the_code_of_generating_profiles():
    want = expected_code_deps()
    assert want, f"no stage depends on {CODE_DEPS}/${{profile}}/...: the mechanism is gone"
    for where, files in want.items():
        assert actual_code_deps(where) == files, (
            f"{where} is out of step with the code: run `python tests/test_dvc_deps.py`"
        )


def _commit_generated_stages(ws: Path) -> list[str]:
    """Fake the outputs of the stages that run the module behind code-deps/ (the downloads)
    with small files and record them in dvc.lock as if those stages had run; return them."""
    from dvc.repo import Repo

    found = code_stages(ws)
    entries = {e for _, e, _, deps in found if any(d.split("/")[0] == CODE_DEPS for d in deps)}
    names = [name for name, entry, _, _ in found if entry in entries]
    with contextlib.chdir(ws), Repo(str(ws)) as repo:
        stages = [s for s in repo.index.stages if s.name in names]
        for stage in stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{_rel(path, ws)}: a stand-in\n")
        for stage in stages:
            repo.commit(stage.addressing, force=True)
        return [s.addressing for s in stages]


def _changed(ws: Path, stages: list[str]) -> dict[str, list]:
    from dvc.repo import Repo

    with contextlib.chdir(ws), Repo(str(ws)) as repo:
        return repo.status(targets=stages)


def _append(files: list[Path]) -> None:
    for path in files:
        with path.open("a") as f:
            f.write("# an edit\n")


@pytest.mark.parametrize("profile", ["full", "paper"])
def test_no_code_edit_changes_a_download_pinned_by_checksum(tmp_path, profile):
    if _profiles(REPO)[profile]["download"]["generate_sample"]:
        pytest.skip(f"the {profile} profile generates its inputs")
    ws = workspace(tmp_path, profile)
    stages = _commit_generated_stages(ws)
    assert stages, f"no stage depends on {CODE_DEPS}/${{profile}}/: the downloads follow code"
    assert _changed(ws, stages) == {}
    _append([p for pkg in PACKAGES for p in (ws / pkg).rglob("*.py")])  # every module
    assert _changed(ws, stages) == {}


def test_a_generator_edit_changes_the_generated_archives(tmp_path):
    ws = workspace(tmp_path, "sample")
    assert _profiles(ws)["sample"]["download"]["generate_sample"]
    stages = _commit_generated_stages(ws)
    assert stages, f"no stage depends on {CODE_DEPS}/${{profile}}/"
    assert _changed(ws, stages) == {}
    entries = {entry for name, entry, _, _ in code_stages(ws) if name in stages}
    used = {p for entry in entries for p in closure(entry, root=ws)}
    _append([p for pkg in PACKAGES for p in (ws / pkg).rglob("*.py") if p not in used])
    assert _changed(ws, stages) == {}  # code the generator does not run
    generator = ws / "pipeline" / "data" / "sample.py"
    assert generator in used, "the sample generator moved: name its new module here"
    _append([generator])
    changed = _changed(ws, stages)
    assert sorted(changed) == sorted(stages), changed
    for stage in stages:
        assert f"{CODE_DEPS}/sample/" in str(changed[stage]), changed[stage]


if __name__ == "__main__":  # relink code-deps/ after a module was added, renamed or removed
    sync_code_deps()
