"""Build step: zoo/ stays the top-level folder users browse, and ships inside the
package as mlx_skipless/zoo_data, so an installed wheel has the same model configs
and recipes (mlx_skipless/zoo.py looks there first). An editable install reads
zoo/ from the checkout itself."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ZOO = Path(__file__).resolve().parent / "zoo"


class BuildPyWithZoo(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            shutil.copytree(
                ZOO,
                Path(self.build_lib) / "mlx_skipless" / "zoo_data",
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"),
            )


setup(cmdclass={"build_py": BuildPyWithZoo})
