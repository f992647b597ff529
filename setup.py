"""Packages of the wheel: `prfaas`, and the top-level `services/` folders installed as
`prfaas.services` (so that an install claims no top-level `services` name in site-packages;
the services import each other relatively, so they run under either name). Everything else is
in pyproject.toml."""

from setuptools import find_packages, setup

services = ["prfaas.services" + name.removeprefix("services") for name in find_packages(include=["services*"])]
setup(
    packages=find_packages(include=["prfaas*"]) + services,
    package_dir={"prfaas.services": "services"},
)
