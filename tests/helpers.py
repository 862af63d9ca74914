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


def peaked_gpt(seed: int, cfg):
    """A random GPT of `cfg` with its weights scaled up so that its next-token distributions are
    peaked and differ between seeds (at the default init they are nearly uniform)."""
    import torch
    from gmlib.model import GPT
    torch.manual_seed(seed)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(25.0 if name == "wte.weight" else 8.0)
    return m
