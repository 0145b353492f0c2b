"""Package discovery for setuptools: every package under mlx_video/ (a new family's package included, with no
list to edit), plus the two folders that pyproject.toml maps into it (convert/, kernels/)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["mlx_video", "mlx_video.*"]) + ["mlx_video.convert", "mlx_video.kernel_sources"])
