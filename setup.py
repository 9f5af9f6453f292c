"""Package discovery (all other metadata is in pyproject.toml).

Every package under fastinsight/ is found automatically, so a new subpackage ships without
editing any configuration. kernels/ and export/ sit at the repository root (the design card's
rooms) but ship inside the fastinsight namespace as fastinsight.kernels / fastinsight.export:
nothing installs a top-level ``kernels`` or ``export``.
"""

from __future__ import annotations

from setuptools import find_packages, setup

# repository folder -> the package name it ships as
ROOT_PACKAGES = {"kernels": "fastinsight.kernels", "export": "fastinsight.export"}

packages = find_packages(include=["fastinsight", "fastinsight.*"])
package_dir = {"fastinsight": "fastinsight"}
for folder, name in ROOT_PACKAGES.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# PEP 561: the package is typed (mypy-checked); type checkers of embedding code read its hints.
setup(packages=packages, package_dir=package_dir, package_data={"fastinsight": ["py.typed"]})
