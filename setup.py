"""Packaging that pyproject.toml cannot say: the top-level `conf/` folder (where reviewers
read and diff the configs) ships inside the package as `xgen.conf`, so a wheel or a
non-editable install has its Hydra configs. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["xgen", "xgen.*"]), "xgen.conf"],
    package_dir={"xgen.conf": "conf"},
)
