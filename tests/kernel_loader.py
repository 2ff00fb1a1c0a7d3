"""The one place the tests load ``fxlra.kernels``: as installed, or in a source checkout the
kernels/ folder registered under that name, as pyproject.toml maps it. Importing this module
does nothing else (subprocess scripts import it with or without Triton, in either Triton mode)."""
import importlib
import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


def kernels_package():
    """``fxlra.kernels``, importing it (or registering the kernels/ folder as it) if needed."""
    try:
        return importlib.import_module("fxlra.kernels")
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "fxlra.kernels", KERNELS_DIR / "__init__.py",
            submodule_search_locations=[str(KERNELS_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["fxlra.kernels"] = package
        spec.loader.exec_module(package)
        import fxlra
        fxlra.kernels = package
        return package
