"""tokenslim's own version, and checks that an installed framework is a release whose internals
tokenslim is tested against."""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

__version__ = "0.1.0"
"""tokenslim's version (as in pyproject.toml)."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """``"1.0.31.dev0+cu"`` -> ``(1, 0, 31)``: the leading numeric release parts."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def check_release(package: str, version: str, lowest: Tuple[int, ...], highest: Tuple[int, ...], what: str,
                  install: str) -> None:
    """Raise ``RuntimeError`` unless ``lowest <= version <= highest`` (first three parts).

    Args:
        package: the distribution name, for the message.
        version: the installed version string.
        what: which internals tokenslim relies on, for the message.
        install: the pip requirement that installs a tested release.
    """
    if not lowest <= version_tuple(version)[:3] <= highest:
        raise RuntimeError(
            f"tokenslim patches {what} and is tested with {package} {'.'.join(map(str, lowest))} to "
            f"{'.'.join(map(str, highest)).replace('.999', '.x')}; {package} {version} is installed. "
            f"Install a tested release: pip install '{install}'"
        )


def check_installed(module: str, version: Optional[str], package: str, lowest: Tuple[int, ...],
                    highest: Tuple[int, ...], what: str, install: str) -> None:
    """:func:`check_release` on ``version``, or on the installed ``module.__version__`` when ``None``."""
    if version is None:
        version = importlib.import_module(module).__version__
    check_release(package, version, lowest, highest, what, install)
