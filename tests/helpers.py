"""Helpers shared by the tests (pytest puts this folder on sys.path)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script(relpath: str):
    """A script of the repository that is not in a package (scripts/, bench/), imported as a module."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
