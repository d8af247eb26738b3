"""The check that the running torch is the release fastmoe's C++ library was compiled against.

torch keeps its C++ ABI only within a minor release (2.11.0 and 2.11.1 are compatible, 2.11 and 2.12 are not), and
loading the library into another one fails on an undefined symbol at best. The build records the version it
compiled against in ``fastmoe/_build_info.py`` (written by CMake); importing this module compares it with
``torch.__version__`` and raises an ImportError that names both versions and how to rebuild. ``fastmoe``
imports it before it loads the library.
"""

import re

import torch

REBUILD = (
    'rebuild fastmoe against the installed torch (in the source tree: pip install --no-build-isolation ".", or '
    "make build in a development checkout), or install the torch release it was built against"
)


def minor_release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``2.11.0+cu130`` or ``2.12.0a0+git1234``."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"torch version must start with MAJOR.MINOR, got {version!r}")
    return int(match.group(1)), int(match.group(2))


def mismatch(built: str, running: str) -> str | None:
    """None when ``running`` is in the minor release of ``built``, else the message of the ImportError."""
    if minor_release(built) == minor_release(running):
        return None
    major, minor = minor_release(built)
    return (
        f"fastmoe's C++ library was built against torch {built}, but torch {running} is installed; torch keeps its "
        f"C++ ABI only within a minor release ({major}.{minor}.x), so the library cannot be loaded. To fix it, "
        + REBUILD
        + "."
    )


def built_torch_version() -> str | None:
    """The version the build recorded, or None for a build from before fastmoe recorded it."""
    try:
        from fastmoe._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def check() -> None:
    built = built_torch_version()
    if built is None:
        return  # not built yet (importing fastmoe._C then says so) or built before the version was recorded
    message = mismatch(built, torch.__version__)
    if message is not None:
        raise ImportError(message)


check()
