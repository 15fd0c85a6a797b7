"""Files guard ships beside its code: the TorchServe handlers and the serving configs.

Their source of truth is the repository's ``handlers/`` and ``deploy/`` directories; the build maps
them to the subpackages ``guard._assets.handlers`` and ``guard._assets.deploy`` (setup.py
``package_dir``), so a wheel, a ``pip install --target`` and an editable install all find them here
through :mod:`importlib.resources`, never through a source checkout's layout. The handler modules are
data for ``guard archive`` (TorchServe imports them by file name inside a worker); nothing in guard
imports them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _path(package: str, name: str) -> Path:
    path = Path(str(files(f"{__name__}.{package}").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not installed with guard ({__name__}.{package}): reinstall guard")
    return path


def handler_file(name: str = "guarded_handler.py") -> Path:
    """A TorchServe handler file guard packs into archives (``guarded_handler.py``, ``baseline_handler.py``)."""
    return _path("handlers", name)


def deploy_file(name: str) -> Path:
    """A serving config ``guard serve`` starts TorchServe with (``config.properties``, ``metrics.yaml``)."""
    return _path("deploy", name)


__all__ = ["deploy_file", "handler_file"]
