"""Serving a trained gm: its router and its experts, read through the store.

gmlib.gm trains a gm into out_dir (gm.json, router/, store/); this module reads it back.
  LoadedGM        the handle: .router, .expert(e) (a GPT in eval mode), .store, .info (gm.json),
                  .close() or `with`, which releases the store
  load_gm         LoadedGM of a finished gm's folder
  load_seed       the BTM seed run alone, with its accounting
  mixture_loader  a gmlib.registry loader of the kind "gm" (mixtures, single experts, the seed),
                  passed to registry.load_models(..., loaders={"gm": ...})
"""
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch

from .checkpoint import load_state_tensors
from .gm_rank import SEED, state_bytes
from .lm import SingleLM
from .mixture import MixtureConfig, MixtureLM, ScoreMemo
from .model import GPT, GPTConfig
from .router import load_router
from .store import ExpertStore


class LoadedGM:
    """A finished gm ready to serve. expert(e) returns expert e as a GPT in eval mode; the weights
    come through the store's tiers (GPU LRU of gpu_bytes, RAM LRU of ram_bytes, disk) into a pool
    of `pool` GPT modules, the least recently used one reused: use pool >= k when generating with a
    top-k mixture, since the k experts are used together. info is gm.json (experts, shares,
    accounting, records, ...); the store stays open until close()."""

    def __init__(self, out_dir, device="cpu", gpu_bytes: int | None = None, ram_bytes: int | None = None,
                 pool: int = 2):
        out = Path(out_dir)
        if not (out / "gm.json").is_file():
            raise FileNotFoundError(f"{out}: no gm.json, so not a finished gm (run train_gm)")
        self.dir, self.info = out, json.loads((out / "gm.json").read_text())
        self.router = load_router(out / self.info["router_path"])
        self.model_config, self.device, self.pool = GPTConfig(**self.info["model_config"]), torch.device(device), pool
        one = state_bytes(self.model_config) // 3 + 256  # weights only, the way finished experts are stored
        self.store = ExpertStore(out / "store", ram_bytes or 4 * one, gpu_bytes or 2 * one, self.device)
        self._models = OrderedDict()

    @property
    def n_experts(self) -> int:
        return self.info["n_experts"]

    @property
    def experts(self) -> list[str]:
        """The store names of the trained experts (gm.json's list; fine-tuned ones are not in it)."""
        return self.info["experts"]

    @property
    def shares(self) -> list[float]:
        return self.info["shares"]

    @property
    def params_per_expert(self) -> int:
        return self.model_config.n_params

    def expert(self, e: int) -> GPT:
        models = self._models
        if e in models:
            models.move_to_end(e)
            return models[e]
        # the store's buffers outlive this call: never let them become inference tensors (a first load
        # inside torch.inference_mode, as log-linear pooling makes, would break every later copy)
        with torch.inference_mode(False), torch.no_grad():
            m = models.popitem(last=False)[1] if len(models) >= self.pool else GPT(self.model_config).to(self.device)
            tensors, _ = self.store.get(self.experts[e])
            load_state_tensors(m, None, {k: v for k, v in tensors.items() if k.startswith("model.")})
        models[e] = m.eval()
        return models[e]

    def file_hashes(self) -> dict:
        """{"<expert>/<file>": sha256} of every stored file of the trained experts (gm.json's list):
        what a caller checks to show that they were only read (fine-tuning writes new experts beside them)."""
        out = {}
        for name in self.experts:
            root = self.dir / "store" / name
            out.update({f"{name}/{p.relative_to(root)}": hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(root.rglob("*")) if p.is_file()})
        return out

    def close(self):
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_gm(out_dir, device="cpu", gpu_bytes: int | None = None, ram_bytes: int | None = None,
            pool: int = 2) -> LoadedGM:
    """The finished gm in out_dir as a LoadedGM (see there for the tiers and the pool)."""
    return LoadedGM(out_dir, device, gpu_bytes, ram_bytes, pool)


def load_seed(out_dir, device="cpu") -> tuple[GPT, dict]:
    """The BTM seed run of the gm in out_dir (the store entry SEED) as a GPT in eval mode, and its
    accounting (gm.json's accounting["seed_run"]). A gm trained without a seed is an error."""
    out = Path(out_dir)
    info = json.loads((out / "gm.json").read_text())
    acct = info["accounting"].get("seed_run")
    if not acct or not (out / "experts" / f"{SEED}.json").is_file():
        raise FileNotFoundError(f"{out}: this gm has no seed run (seed_fraction and seed_steps were 0)")
    store = ExpertStore(out / "store", 4 * state_bytes(GPTConfig(**info["model_config"])), 0, torch.device("cpu"))
    model = GPT(GPTConfig(**info["model_config"]))
    load_state_tensors(model, None, {k: v for k, v in store.read(SEED)[0].items() if k.startswith("model.")})
    store.close()
    return model.to(device).eval(), acct


def mixture_loader(gm_root):
    """A gmlib.registry loader for specs {"kind": "gm", "run": <name under gm_root>, "k", "eta", ...}:
    registry.load_models(specs, device, loaders={"gm": mixture_loader(work_dir(run_name) / "gm")}).
    A spec with "expert": e gives that expert alone (a SingleLM, charged its own training seconds);
    one with "seed": True the seed run alone (charged the seed run's seconds). Mixtures of one gm share
    a remembered router, and with "share_passes": True their experts' passes over the documents
    (worth it when k up to n_experts is scored: each expert then reads every document once, in full)."""
    memos, passes = {}, {}  # per gm: a remembered router, and with share_passes its experts' passes

    def load(spec: dict, device):
        if spec.get("seed"):
            model, acct = load_seed(Path(gm_root) / spec["run"], device)
            lm = SingleLM(model)
            lm.train_gpu_seconds = acct["gpu_seconds"]
            return lm
        if "expert" in spec:
            with load_gm(Path(gm_root) / spec["run"], device, pool=1) as g:
                lm = SingleLM(g.expert(spec["expert"]))
                lm.train_gpu_seconds = g.info["records"][spec["expert"]]["accounting"]["gpu_seconds"]
            return lm
        mc = MixtureConfig.from_spec(spec)
        n = json.loads((Path(gm_root) / spec["run"] / "gm.json").read_text())["n_experts"]
        g = load_gm(Path(gm_root) / spec["run"], device, pool=mc.experts_held(n, at_least=2))
        router = memos.setdefault(spec["run"], ScoreMemo(g.router))
        shared = passes.setdefault(spec["run"], {}) if spec.get("share_passes") else None
        lm = MixtureLM(g.expert, g.n_experts, router, mc, expert_n_params=g.params_per_expert, passes=shared)
        lm.train_gpu_seconds = g.info["accounting"]["gpu_seconds"]
        return lm
    return load
