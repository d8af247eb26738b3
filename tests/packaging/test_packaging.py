"""The package's metadata and its torch check: ranges for the runtime dependencies (pins belong to
requirements-dev.txt), a distribution name of its own, install hints that name something installable, and an
import that refuses a torch of another minor release with a message naming both versions."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from fastmoe import _torch_abi

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11 (tomllib)")
ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
RUNNING_TORCH = Version(Version(str(torch.__version__)).base_version)


def requirements(names: list[str]) -> dict[str, Requirement]:
    return {req.name: req for req in map(Requirement, names)}


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_runtime_dependencies_are_ranges_that_take_ordinary_releases():
    deps = requirements(PROJECT["dependencies"])
    extras = [req for names in PROJECT["optional-dependencies"].values() for req in map(Requirement, names)]
    pinned = [str(req) for req in [*deps.values(), *extras] if any(s.operator == "==" for s in req.specifier)]
    assert not pinned, f"pins belong to requirements-dev.txt, not the package metadata: {pinned}"
    # A tqdm that is not the one CI pins (pip check reported a conflict with it when tqdm was pinned).
    assert deps["tqdm"].specifier.contains("4.67.1")
    # torch: the running release and its patch releases, but not the next minor one (another C++ ABI).
    torch_spec = deps["torch"].specifier
    major, minor = RUNNING_TORCH.major, RUNNING_TORCH.minor
    assert torch_spec.contains(str(RUNNING_TORCH)) and torch_spec.contains(f"{major}.{minor}.9")
    assert not torch_spec.contains(f"{major}.{minor + 1}.0")
    assert not torch_spec.contains(f"{major}.{minor - 1}.0")


def test_the_dev_requirements_pin_what_the_package_accepts():
    pins = {}
    for name in ("requirements-dev.txt", "requirements-cutlass.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                assert [s.operator for s in req.specifier] == ["=="], f"{name} must pin, got {line!r}"
                pins[req.name] = next(iter(req.specifier)).version
    assert "nvidia-cutlass" in pins, "requirements-cutlass.txt must pin the CUTLASS headers' wheel"
    for req in requirements(PROJECT["dependencies"]).values():
        assert req.specifier.contains(pins[req.name]), f"{req} does not accept the pinned {req.name}=={pins[req.name]}"
    build = requirements(PYPROJECT["build-system"]["requires"])
    for name in ("scikit-build-core", "cmake", "ninja", "torch"):
        assert build[name].specifier.contains(pins[name]), f"build-system {build[name]} vs pinned {pins[name]}"


def test_the_readme_installs_the_build_requirements_before_a_build_without_isolation():
    """Without build isolation pip installs none of build-system.requires: the README must, with the same
    bounds, before its ``pip install --no-build-isolation .``."""
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install") and "scikit-build-core" in line)
    assert readme.index(first) < readme.index("pip install --no-build-isolation .")
    documented = requirements([word.strip('"') for word in first.split("#")[0].split()[2:]])
    build = requirements(PYPROJECT["build-system"]["requires"])
    assert set(documented) == set(build) - {"torch"}
    for name, req in documented.items():
        assert req.specifier == build[name].specifier, f"README {req} vs build-system {build[name]}"


def test_the_distribution_name_is_not_fastmoes_and_the_readme_says_how_to_get_the_extras():
    name = PROJECT["name"]
    # FastMoE's setup.py calls its distribution "fastmoe"; installing one would uninstall the other.
    assert name.lower().replace("_", "-") != "fastmoe"
    readme = (ROOT / "README.md").read_text()
    assert f"`{name}`" in readme
    for extra in PROJECT["optional-dependencies"]:
        assert f'".[{extra}]"' in readme, f"README.md does not say how to install the extra {extra!r}"


def test_without_matplotlib_the_trainer_names_an_installable_package(tmp_path):
    """The hint must work from anywhere: the extra lives only in the source tree, so it names matplotlib."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` raise ImportError
        "from pathlib import Path\n"
        "from fastmoe.train import report\n"
        f"assert report.plot([], Path({str(tmp_path / 'x.png')!r}), 'title') is None\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "matplotlib is not installed (pip install matplotlib" in result.stdout
    assert "fastmoe[" not in result.stdout
    train = requirements(PROJECT["optional-dependencies"]["train"])
    assert set(train) == {"matplotlib"}


@pytest.mark.parametrize(
    "built,running",
    [("2.11.0", "2.11.0"), ("2.11.0", "2.11.1+cu130"), ("2.11.0", "2.11.0+cpu"), ("2.12.0", "2.12.0a0+git1234")],
)
def test_the_same_minor_release_passes(built, running):
    assert _torch_abi.mismatch(built, running) is None


@pytest.mark.parametrize("built,running", [("2.11.0", "2.12.0"), ("2.11.0", "2.10.1+cpu"), ("2.11.0", "3.11.0")])
def test_another_minor_release_is_refused_naming_both_versions(built, running):
    message = _torch_abi.mismatch(built, running)
    assert f"built against torch {built}, but torch {running} is installed" in message
    assert 'pip install --no-build-isolation "."' in message and "make build" in message


def test_a_version_without_major_and_minor_is_a_clear_error():
    with pytest.raises(ValueError, match="torch version must start with MAJOR.MINOR, got 'dev'"):
        _torch_abi.minor_release("dev")


def test_the_build_recorded_the_torch_it_compiled_against():
    built = _torch_abi.built_torch_version()
    assert built is not None, "python/fastmoe/_build_info.py is missing: the build must write it"
    assert _torch_abi.minor_release(built) == (RUNNING_TORCH.major, RUNNING_TORCH.minor)


def test_importing_fastmoe_under_another_torch_release_raises_before_loading_the_library():
    other = f"{RUNNING_TORCH.major}.{RUNNING_TORCH.minor + 1}.0"
    code = (
        "import sys, torch\n"
        f"torch.__version__ = {other!r}\n"  # as if torch had been upgraded after fastmoe was built
        "try:\n"
        "    import fastmoe\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
        "    print('library loaded:', 'fastmoe._C' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    built = _torch_abi.built_torch_version()
    assert f"ImportError: fastmoe's C++ library was built against torch {built}, but torch {other}" in result.stdout
    assert "library loaded: False" in result.stdout
    assert run_python("import fastmoe").returncode == 0
