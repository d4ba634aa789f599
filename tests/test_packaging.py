"""The install claims of the README, checked on what a user installs: the wheel and the sdist
built as a registry would build them (``uv build``), their contents and metadata; the slow ones
run the sdist's tests, resolve the pinned study set for every Python the classifiers name, and
try the study's install with pip and with uv."""

import email
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT

import gradalign

UV = [sys.executable, "-m", "uv"]
PINNED = REPO_ROOT / "requirements.txt"


def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The wheel and the sdist of this checkout."""
    out = tmp_path_factory.mktemp("dist")
    built = run([*UV, "build", "--quiet", "--out-dir", str(out), str(REPO_ROOT)])
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def metadata(dists):
    with zipfile.ZipFile(dists[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(wheel.read(name))


def test_the_wheel_holds_the_package_its_types_and_licence_and_nothing_else(dists):
    with zipfile.ZipFile(dists[0]) as wheel:
        names = set(wheel.namelist())
    package = {
        p.relative_to(REPO_ROOT / "src").as_posix()
        for p in (REPO_ROOT / "src").rglob("*")
        if p.is_file() and p.suffix in (".py", ".typed")
    }
    info = f"gradalign-{gradalign.__version__}.dist-info"
    assert "gradalign/py.typed" in package
    made = ("METADATA", "WHEEL", "RECORD", "top_level.txt", "licenses/LICENSE")
    assert names - package == {f"{info}/{n}" for n in made}
    assert package <= names


def test_the_optimizer_alone_needs_only_torch_and_the_metadata_is_complete(metadata):
    requires = metadata.get_all("Requires-Dist")
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.4"]
    assert metadata["Version"] == gradalign.__version__
    assert metadata["License-Expression"] == "MIT" and metadata["License-File"] == "LICENSE"
    assert metadata["Requires-Python"] == ">=3.11"
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def names(requirements):
    """The distribution names in requirement lines, normalised (PEP 503)."""
    found = set()
    for line in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if match and not line.lstrip().startswith(("#", "-")):
            found.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return found


def test_the_extras_name_everything_the_pinned_set_installs(metadata):
    """gradalign[study] (with [postgres] and [dev]) is requirements.txt unpinned: the same
    distributions, so an environment made from either runs the study."""
    extras = [r.split(";")[0] for r in metadata.get_all("Requires-Dist") if "extra ==" in r]
    assert names(PINNED.read_text().splitlines()) == names(extras) | {"torch"}


def test_the_sdist_holds_the_whole_source_tree(dists):
    """Every file git tracks (or would: untracked, not ignored), so the sdist's tests run."""
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT)
    assert listed.returncode == 0, listed.stderr
    tree = {line for line in listed.stdout.splitlines() if (REPO_ROOT / line).is_file()}
    with tarfile.open(dists[1]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    made = {"PKG-INFO", "setup.cfg"} | {m for m in members if ".egg-info/" in m}
    assert members - made == tree
    assert {"tests/conftest.py", "tests/helpers.py", "tests/services.py", "LICENSE"} <= tree


def test_outside_a_checkout_the_study_s_tools_say_where_they_run(dists, tmp_path):
    """An installed gradalign (the wheel, unpacked as pip would) run where there is no clone."""
    site = tmp_path / "site"
    with zipfile.ZipFile(dists[0]) as wheel:
        wheel.extractall(site)
    done = run(
        [sys.executable, "-m", "gradalign.doctor", "--dry-run"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: no gradalign checkout (conf/config.yaml and train.py) in {tmp_path} or above "
        "it: the study's commands run in a clone of the repository"
    ]


@pytest.mark.slow
def test_the_sdist_s_tests_pass(dists, tmp_path):
    """The sdist's own fast suite, run from it (its src/ first on the path), but this module,
    which builds from a git checkout."""
    with tarfile.open(dists[1]) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    env = {"PYTHONPATH": str(root / "src"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    where = run([sys.executable, "-c", "import gradalign; print(gradalign.__file__)"], env=env)
    assert where.stdout.strip() == str(root / "src" / "gradalign" / "__init__.py")
    suite = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    done = run([*suite, "--ignore", "tests/test_packaging.py"], cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\d+ passed", done.stdout.splitlines()[-1])


def classified_pythons():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    return re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject)


@pytest.mark.slow
def test_the_pinned_set_installs_on_every_classified_python_and_not_below(metadata, tmp_path):
    """uv resolves requirements.txt for Linux x86-64 wheels of each Python the classifiers
    name (it checks each wheel's tags); the Python below requires-python does not resolve."""
    floor = metadata["Requires-Python"].removeprefix(">=")
    pythons = classified_pythons()
    assert pythons[0] == floor
    below = f"3.{int(floor.split('.')[1]) - 1}"
    for python in [*pythons, below]:
        done = run(
            [*UV, "pip", "compile", "--quiet", "--python-version", python]
            + ["--python-platform", "x86_64-manylinux_2_28", str(PINNED)]
            + ["-o", str(tmp_path / f"{python}.txt")],
            cwd=REPO_ROOT,
        )
        assert (done.returncode == 0) == (python != below), (python, done.stderr[-2000:])


@pytest.mark.slow
def test_the_study_installs_with_uv_from_the_checkout_and_not_with_plain_pip():
    """The README's claim: hydra-optuna-sweeper 1.3.0 declares optuna<3, which pip cannot
    override; uv applies pyproject.toml's override when it runs in the checkout."""
    with_uv = run([*UV, "pip", "install", "--dry-run", "-e", ".[study]"], cwd=REPO_ROOT)
    assert with_uv.returncode == 0, with_uv.stderr[-2000:]
    with_pip = run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "-e", ".[study]"], cwd=REPO_ROOT
    )
    assert with_pip.returncode != 0 and "ResolutionImpossible" in with_pip.stderr
    assert "hydra-optuna-sweeper 1.3.0 depends on optuna<3" in with_pip.stdout + with_pip.stderr
