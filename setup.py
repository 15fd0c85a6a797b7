"""Packages of the build: everything under guard/, plus handlers/ and deploy/ installed inside guard.

The handlers and the serving configs live at the repository root (their source of truth: TorchServe,
Docker and the docs name them there); ``package_dir`` installs them as ``guard._assets.handlers`` and
``guard._assets.deploy``, where :mod:`guard._assets` finds them with importlib.resources in a wheel,
a ``--target`` install and an editable install alike. The rest of the metadata is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

ASSETS = {"guard._assets.handlers": "handlers", "guard._assets.deploy": "deploy"}

setup(
    packages=[*find_namespace_packages(include=["guard", "guard.*"]), *ASSETS],
    package_dir=ASSETS,
    package_data={"guard": ["py.typed"],
                  "guard._assets.deploy": ["config.properties", "metrics.yaml", "nginx/*.conf", "nginx/*.template"]},
)
