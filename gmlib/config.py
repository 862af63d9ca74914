"""One path from a parameter to the run.

A notebook's parameters are the names its cell tagged `parameters` assigns. Those a notebook hands to a
config dataclass (TrainConfig, GPTConfig, GMConfig, FinetuneConfig, ...) carry the field's own name, and
reach it by one call, `fields(params, TrainConfig)`, never retyped as keyword arguments. A YAML params file
is a flat mapping of the same names, whether papermill reads it (scripts/run_notebooks.py,
scripts/run_experiment.py) or a script (scripts/train_gm.py, the gm of notebook 04 without the notebook).

check() is the one guard: papermill only warns about a misspelt `-p` name, so a name the notebook does not
declare is refused here, and so is a value of the wrong type (the dataclass field's annotation, else the
type of the cell's default; a cell default of None takes anything, and None passes for a name that is no
field: such a notebook setting documents what None means).

PRESETS are named sets of the fast training settings (flat TrainConfig and GPTConfig names) that
bench/train_speed.py measured; its variants are a preset plus overrides, and notebooks 03 and 04 take one
by their `preset` parameter. A preset's settings replace the parameter cell's; a name given explicitly
(papermill's injected cell, or a YAML key) wins over the preset.
"""
import ast
import json
import types
import typing
from dataclasses import fields as dc_fields
from pathlib import Path

from .paths import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}  # what IPython puts in a fresh namespace

PRESETS = {
    # train_speed.py's reference: compiled, micro-batch 32 (124m on an H100: 533k tokens/s, 41.5% MFU)
    "compiled": dict(compile=True, batch_size=32),
    # the measured gains stacked: batch 64, ReLU², cuDNN's fused attention (124m, H100: 552.8k; H200: 599.1k)
    "fast": dict(compile=True, batch_size=64, activation="relu2", sdpa="cudnn"),
    # the README's fastest 124m (H200: 673.4k tokens/s, 52.4% MFU): + 6 heads of 128, bf16 residual, FP8
    # matmuls. n_head=6 fits 124m's width (768); 350m takes n_head=8 over it
    "fastest": dict(compile=True, batch_size=64, activation="relu2", sdpa="cudnn", n_head=6, bf16_residual=True,
                    fp8="all"),
}


def notebook_path(notebook) -> Path:
    """A notebook by stem ("03_train_dense") or path."""
    p = Path(notebook)
    return p if p.suffix == ".ipynb" else NOTEBOOKS / f"{p.name}.ipynb"


def declared(notebook) -> dict:
    """name -> default of the notebook's `parameters` cell (read, not run); an annotated name
    (`x: bool | list = True`) also declares its type, under declared_types()."""
    return {k: v for k, (v, _) in _cell(notebook_path(notebook)).items()}


def declared_types(notebook) -> dict:
    return {k: t for k, (_, t) in _cell(notebook_path(notebook)).items() if t is not None}


_CELLS = {}


def _cell(nb: Path) -> dict:
    key = (nb, nb.stat().st_mtime_ns)
    if key not in _CELLS:
        cells = [c for c in json.loads(nb.read_text())["cells"]
                 if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(cells) != 1:
            raise ValueError(f"{nb}: {len(cells)} cells tagged 'parameters', expected exactly one")
        _CELLS[key] = _assigned("".join(cells[0]["source"]))
    return _CELLS[key]


def _assigned(source: str) -> dict:
    """name -> (value, annotation or None) of the top-level assignments in `source`."""
    env = {"__builtins__": {}, **{t.__name__: t for t in (bool, int, float, str, list, dict, tuple)}}
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = eval(compile(ast.Expression(node.value), "<parameters>", "eval"), env)  # the cell's own literals
            ann = eval(compile(ast.Expression(node.annotation), "<parameters>", "eval"), env) \
                if isinstance(node, ast.AnnAssign) else None
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(t, ast.Name):
                    out[t.id] = (value, ann)
    return out


def _ok(v, t) -> bool:
    """Does v fit the annotation t? Lenient where YAML and papermill are: an int for a float, a list for a tuple."""
    if t is typing.Any:
        return True
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return any(_ok(v, a) for a in typing.get_args(t))
    if t is type(None) or t is None:
        return v is None
    t = typing.get_origin(t) or t
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t in (tuple, list):
        return isinstance(v, (tuple, list))
    return isinstance(v, t)


def field_types(*configs) -> dict:
    """name -> annotation over the configs' fields; the first config that has a name decides."""
    out = {}
    for cls in configs:
        for k, t in typing.get_type_hints(cls).items():
            out.setdefault(k, t)
    return out


def check(values: dict, notebook, *configs, given=None, all_fields: bool = False) -> dict:
    """`values` (name -> value) checked against the notebook's parameters and the configs' field types,
    with a `preset` expanded: its settings replace those not in `given` (default: every name of values
    is given). all_fields: every field of the configs is a known name too (scripts/train_gm.py reads
    GMConfig's own dialect beside the notebook's). Returns the checked values, sorted by name."""
    decl, ann, hints = declared(notebook), declared_types(notebook), field_types(*configs)
    where = notebook_path(notebook).stem
    known = set(decl) | (set(hints) if all_fields else set())
    if bad := sorted(set(values) - known):
        raise ValueError(f"{where}: unknown parameter(s) {bad}; known: {sorted(known)}")
    values = dict(values)
    if values.get("preset"):
        if values["preset"] not in PRESETS:
            raise ValueError(f"{where}: preset={values['preset']!r}; choose one of {sorted(PRESETS)}")
        given = set(values) if given is None else set(given)
        for k, v in PRESETS[values["preset"]].items():
            if k not in known:
                raise ValueError(f"{where}: preset {values['preset']!r} sets {k!r}, which is not a parameter here")
            if k not in given:
                values[k] = v
    for k, v in values.items():
        default = decl.get(k)
        if k in ann:
            ok = _ok(v, ann[k])
        elif k in hints:
            ok = _ok(v, hints[k]) or (v is None and default is None)  # a cell's None: "the preset's", "unset"
        else:
            ok = v is None or default is None or _ok(v, type(default))
        if not ok:
            want = ann.get(k, hints.get(k, type(default).__name__))
            raise TypeError(f"{where}: parameter {k}={v!r} ({type(v).__name__}); expected {want}")
    return dict(sorted(values.items()))


def notebook_params(ns: dict, notebook, *configs) -> dict:
    """In a notebook's first cell: the parameters in its namespace `ns` (globals()), checked as check()
    does, a preset expanded under the names papermill injected. The notebook then takes the values back
    (globals().update(params)), so that a preset's settings are what the cells below read."""
    values = {k: v for k, v in ns.items() if not k.startswith("_") and k not in KERNEL_NAMES}
    return check(values, notebook, *configs, given=injected(ns))


def injected(ns: dict) -> set:
    """The names papermill's injected cell ("# Parameters" first) assigned in this kernel: what a run
    was given, as against the parameter cell's defaults. None outside papermill (Lab, nbval)."""
    for src in reversed(ns.get("In") or []):
        if src.startswith("# Parameters\n"):
            return set(_assigned(src))
    return set()


def fields(params: dict, *configs) -> dict:
    """The params that are fields of the configs, for cls(**fields(params, cls)). A None for a field that
    cannot hold one means the field's own default (the cell's "None: the preset's"), so it is left out."""
    hints = field_types(*configs)
    names = {f.name for cls in configs for f in dc_fields(cls)}
    return {k: v for k, v in params.items() if k in names and not (v is None and not _ok(None, hints[k]))}
