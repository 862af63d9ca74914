"""Models to evaluate, from specs: {name, kind, ...} -> a loaded model with gmlib.lm's interface.
The kinds every evaluation knows are dense checkpoints and mixtures over them; a caller adds its own
(gmlib.serve.mixture_loader for a trained gm) through load_models(..., loaders=...).
"""
from functools import lru_cache

from .checkpoint import load_checkpoint, load_model, read_meta
from .lm import SingleLM
from .mixture import MixtureConfig, MixtureLM


def _load_dense(spec: dict, device):
    model, meta = load_checkpoint(spec["path"], device=device)
    lm = SingleLM(model.eval())
    lm.train_gpu_seconds = (meta.get("accounting") or {}).get("gpu_seconds")
    return lm


def _load_mixture(spec: dict, device):
    """A mixture over dense checkpoints (spec["experts"]: paths), optionally with a router object;
    at most k experts are kept loaded (an LRU of checkpoints)."""
    paths = list(spec["experts"])
    cfg = MixtureConfig.from_spec(spec)

    @lru_cache(maxsize=cfg.experts_held(len(paths)))  # log-linear holds every expert
    def load_expert(e):
        return load_model(paths[e], device=device)

    lm = MixtureLM(load_expert, len(paths), router=spec.get("router"), cfg=cfg, base_prior=spec.get("base_prior"))
    secs = [(read_meta(p).get("accounting") or {}).get("gpu_seconds") for p in paths]  # headers only
    lm.train_gpu_seconds = None if None in secs else float(sum(secs))
    return lm


# kind -> loader(spec, device): the kinds every evaluation knows
LOADERS = {"dense": _load_dense, "mixture": _load_mixture}


def load_models(specs: list[dict], device="cpu", loaders: dict | None = None) -> dict:
    """{name: model with the gmlib.lm interface} from specs such as
       {"name": "dense-30m", "kind": "dense", "path": ".../checkpoint.safetensors"}
       {"name": "ens-k2", "kind": "mixture", "experts": [paths], "k": 2, "eta": 1.0}
    loaders adds kinds to LOADERS for this call, e.g. {"gm": gmlib.serve.mixture_loader(gm_root)}.
    Each model carries params_total, params_active and train_gpu_seconds (None if unknown)."""
    out, known = {}, {**LOADERS, **(loaders or {})}
    for spec in specs:
        kind, name = spec.get("kind", "dense"), spec.get("name")
        if not name or name in out:
            raise ValueError(f"model spec {spec}: needs a unique 'name'")
        if kind not in known:
            raise ValueError(f"model spec {name!r}: unknown kind {kind!r}; known: {sorted(known)}")
        out[name] = known[kind](spec, device)
    return out
