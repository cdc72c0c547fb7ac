"""The one way to find the bench's data files (machines, memory maps, matrices, the lock, guest recipes,
kernel fragments): package data under `testbench/data/`, so an installed bench (`pip install .`, a wheel)
finds them from any directory. The repository's top-level `images/` is a link to the same folder, for
the paths the README and users type (`--config images/matrix.toml`)."""

from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    return Path(str(resources.files("testbench").joinpath("data", *parts)))
