"""Where things live. Paths resolve from the repository root, never from the working
directory, because papermill runs in the caller's folder and nbval in the notebook's."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """The shared raw data: $GM_DATA_DIR, else ../shared/data beside the repository.
    None when neither exists (data_prep then downloads the public sources)."""
    env = os.environ.get("GM_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    default = REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def work_dir(name: str) -> Path:
    """Generated data (cleaned text, token shards, checkpoints): out of git, under work/."""
    root = Path(os.environ.get("GM_WORK_DIR", REPO_ROOT / "work"))
    p = root / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def results_dir(name: str) -> Path:
    """Published outputs of a run (notebooks, params, metrics, figures): results/<name>/.
    Tests point GM_RESULTS_DIR (and GM_WORK_DIR) elsewhere so they never touch published results."""
    root = Path(os.environ.get("GM_RESULTS_DIR", REPO_ROOT / "results"))
    p = root / name
    p.mkdir(parents=True, exist_ok=True)
    return p
