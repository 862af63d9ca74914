"""gm's trainer: many ordinary experts, each trained alone on the documents routed to it.

Policy over mechanism: the router decides which documents each expert sees, the store keeps
every expert's weights and AdamW state on disk / in RAM / on the GPU, the Trainer runs the
ordinary loop, one rank's slots and segments are gmlib.gm_rank's and gm.json is written by
gmlib.gm_summary. This module only decides the schedule:
  1. rank 0 fits the router on (a sample of) the training documents and routes train and val
     into per-expert shard folders: out_dir/routed/round_000/{train,val}/expert_XXX;
  2. optionally (BTM, c-BTM) a seed run: the dense twin's first seed_fraction of the budget on
     all data, trained here by rank 0 exactly as gmlib.train.setup would (same init, data order
     and schedule) or taken from a dense run's branch checkpoint (seed_from). Every expert
     branches from it: the seed's weights, AdamW moments, step and data position, so it goes on
     at the seed's learning rate (no re-warmup) and runs its own decay at the end of its budget.
     Without a seed each expert starts from its own init;
  3. each rank trains the experts it owns (e % world_size == rank) in long segments of
     segment_steps, round-robin: switching is rare, and the next expert is prefetched while one
     trains. Budget (plan_budget): `tokens` is the whole gm's, seed included, as a dense twin's
     max_tokens; what the seed leaves is split by the experts' shares of the routed tokens
     (budget "share"; "fixed": each expert's trajectory is `tokens` long, K times the compute).
     With train_top_r = r each training document goes to its r best experts (r = n_experts:
     every expert sees all data, an ensemble whose members differ in data order and init).
     With group_size G > 1 the segments are those of groups of G experts that train together as one
     fused model (gmlib.fused: one batched forward and backward, each expert's own optimizer, schedule,
     data and accounting), while the others wait in the store;
  4. refinement (optional): the budget is cut into refine_rounds + 1 phases; after a phase every
     expert scores a fixed sample of training documents with ITS OWN model, the router moves each
     document to the expert that predicts it best (the prototypes follow), train and val are
     re-routed and training continues on the new shards;
  5. a final barrier; rank 0 merges the per-expert records into out_dir/gm.json.
No tensor passes between experts or ranks: ranks only wait for each other (torch.distributed
barriers, set up by scripts/train_gm.py under torchrun) and share small files.
Resumable per expert: after each segment the expert's state (weights, AdamW, trainer step and
data position) goes to the store durably, and a rerun takes every expert up where it stopped.
"""
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import atomic
from .data import TokenShards
from .gm_rank import SEED, Rank, branch_state, fresh_state, import_seed, job, state_bytes  # noqa: F401  (state_bytes: API)
from .gm_summary import FORMAT, expert_name, summarize  # noqa: F401  (FORMAT: gm.json's, part of the API)
from .model import GPTConfig, make_config
from . import routing_cache
from .router import load_router, make_router
from .train import TrainConfig, branch_path, branch_step, resolve_device, stable_until

# settings a rerun into the same out_dir may change: they do not change what any expert learns
# (each expert's run is independent of the order of segments; compile, sdpa and group_size change
# only the rounding); every other setting must stay
FREE = {"device", "gpu_bytes", "ram_bytes", "segment_steps", "group_size", "compile", "compile_mode", "sdpa",
        "eval_every", "log_every", "ckpt_every"}


@dataclass
class GMConfig:
    n_experts: int = 4
    router: str = "local"           # local | random | kmeans (gmlib.router)
    router_cfg: dict = field(default_factory=dict)  # RouterConfig overrides, e.g. {"fit_docs": 20000}
    model_size: str = "tiny"        # gmlib.model preset of every expert; vocabulary from the shards
    model: dict = field(default_factory=dict)       # GPTConfig overrides (seq_len, activation, ...)
    budget: str = "share"           # "share": the experts split what the seed leaves of `tokens` by their routed
    #                                 shares; "fixed": each expert's run (seed + own) is `tokens` long
    tokens: int = 1_000_000         # the whole gm's budget, seed included: its dense twin's max_tokens
    segment_steps: int = 1000       # steps an expert trains before the next one is swapped in
    group_size: int = 1             # experts trained together as one fused model (gmlib.fused); 1: one at a time.
    #                                 On an H200, 8 x 30m at batch 32 fused are no faster (1.00x, fused_experts.json)
    seed_fraction: float = 0.0      # share of the budget spent in the seed run every expert branches from; 0: none
    seed_steps: int = 0             # the branch point in steps instead (older params); at most one of the two
    seed_from: str | None = None    # a dense run's checkpoint folder whose branch_<step> file is the seed
    #                                 (gmlib.train.run_with_branches); None: the seed is trained here
    train_top_r: int = 1            # each training document goes to its r best experts (n_experts: to all)
    refine_rounds: int = 0          # expert-feedback re-routings during training (r = 1 only)
    refine_docs: int = 512          # training documents every expert scores for a refinement
    gpu_bytes: int | None = None    # store's GPU tier (None: two groups of expert states)
    ram_bytes: int | None = None    # store's RAM tier (None: this rank's experts + 2, at most half the RAM)
    device: str = "auto"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)  # lr, batch, schedule, weight decay (the seed's
    #                                 and every expert's), ...: max_steps, max_tokens, device, seed and (wsd)
    #                                 decay_frac are set per expert (max_seconds is per expert)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if self.budget not in ("share", "fixed"):
            raise ValueError(f"GMConfig: budget={self.budget!r}; choose 'share' or 'fixed'")
        for k in ("n_experts", "tokens", "segment_steps", "refine_docs", "train_top_r", "group_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"GMConfig: {k}={getattr(self, k)} must be >= 1")
        if not 0 <= self.seed_fraction < 1 or self.seed_steps < 0 or (self.seed_fraction and self.seed_steps):
            raise ValueError(f"GMConfig: give seed_fraction in [0, 1) or seed_steps >= 0, not both "
                             f"(seed_fraction={self.seed_fraction}, seed_steps={self.seed_steps})")
        if self.seed_from and not (self.seed_fraction or self.seed_steps):
            raise ValueError("GMConfig: seed_from needs a branch point (seed_fraction or seed_steps)")
        if self.train_top_r > self.n_experts:
            raise ValueError(f"GMConfig: train_top_r={self.train_top_r} > n_experts={self.n_experts}")
        if self.group_size > 1 and self.train.fp8:
            raise ValueError("GMConfig: fp8 matmuls are not supported in a fused group; use group_size=1")
        if self.train_top_r > 1 and self.refine_rounds:
            raise ValueError("GMConfig: refinement moves each document to one expert; use it with train_top_r=1")

    @classmethod
    def from_dict(cls, d: dict) -> "GMConfig":
        """From a nested dict (as to_dict) or a flat one (the params dialect of notebook 04 and
        scripts/train_gm.py) where TrainConfig and GPTConfig fields sit beside ours."""
        d, own = dict(d), {f.name for f in fields(cls)}
        tfields, mfields = {f.name for f in fields(TrainConfig)}, {f.name for f in fields(GPTConfig)}
        train = d.pop("train", {})
        train = asdict(train) if isinstance(train, TrainConfig) else dict(train)
        train.update({k: d.pop(k) for k in list(d) if k not in own and k in tfields})
        model = {**d.pop("model", {}), **{k: d.pop(k) for k in list(d) if k not in own and k in mfields}}
        if bad := sorted(set(d) - own):
            raise ValueError(f"unknown gm settings {bad}; known: {sorted(own | tfields | mfields)}")
        return cls(**d, model=model, train=TrainConfig(**train))

    def to_dict(self) -> dict:
        return asdict(self)


def _seed(*keys) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()




def plan_budget(cfg: GMConfig, tok_step: int, routed_tokens) -> dict:
    """Every step count of a gm, from its total budget. total_steps is what a dense twin with
    max_tokens = cfg.tokens trains (gmlib.train rounds up the same way); the seed takes the
    first branch_step of them; the experts share the rest by their routed tokens, rounded
    down, so under budget "share" seed + experts never pass the twin's steps (6ND compute).
    An expert's Trainer runs from branch_step to max_steps[e] = branch_step + own_steps[e]."""
    total = math.ceil(cfg.tokens / tok_step)
    branch = cfg.seed_steps or (branch_step(cfg.seed_fraction, total) if cfg.seed_fraction else 0)
    if branch >= total:
        raise ValueError(f"GMConfig: the seed's {branch} steps leave nothing of the budget's {total} "
                         f"(tokens={cfg.tokens}, {tok_step} tokens a step)")
    routed = np.asarray(routed_tokens, np.float64)
    shares = routed / max(1.0, routed.sum())
    if cfg.budget == "share":
        own = [int(math.floor((total - branch) * s + 1e-9)) for s in shares]
    else:
        own = [total - branch] * len(shares)
    own = [o if branch or o else 1 for o in own]  # an expert from scratch trains at least one step
    return {"total_steps": total, "branch_step": branch, "shares": shares, "own_steps": own,
            "max_steps": [branch + o for o in own], "budget_tokens": [o * tok_step for o in own]}


def _flat(d: dict) -> dict:
    return {**{k: v for k, v in d.items() if k != "train"}, **{f"train.{k}": v for k, v in d["train"].items()}}


def _round_done(out: Path, r: int) -> bool:
    return (out / "routed" / f"round_{r:03d}" / "done.json").is_file()


def _route(router, data_root: Path, out: Path, r: int, assign=None, cache=None):
    """Save the router of round r and route train (and val) with it (through the routing cache,
    when given); done.json is written last."""
    rd = out / "routed" / f"round_{r:03d}"
    router.save(out / "router" / f"round_{r:03d}")
    paths = routing_cache.route(router, TokenShards(data_root / "train"), rd / "train", cache, assign=assign)
    if (data_root / "val").is_dir():
        routing_cache.route(router, TokenShards(data_root / "val"), rd / "val", cache)
    docs = json.loads((rd / "train" / "route.json").read_text())["docs"]
    atomic.write_json(rd / "done.json", {"docs": docs, "tokens": [TokenShards(p).n_tokens for p in paths]})


def _refine_sample(train: TokenShards, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, 5]).permutation(train.n_docs)[:n])



def train_gm(cfg: GMConfig, data_root, out_dir, rank: int = 0, world_size: int = 1, verbose: bool = False,
             router=None, assign=None, routing=None) -> dict:
    """Train (or continue) the gm in out_dir on data_root/{train,val}; returns gm.json's content
    on rank 0 and this rank's record elsewhere. With world_size > 1 run under torch.distributed.
    router (and its assign of the training documents) may come already fitted, with cfg's router
    settings, by a caller that has looked at the routing first; otherwise it is fitted here.
    routing: a gmlib.routing_cache folder shared by the gm of one data set (None: no cache)."""
    data_root, out = Path(data_root), Path(out_dir)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("train_gm: world_size > 1 needs torch.distributed; launch scripts/train_gm.py with torchrun")
    train_all = TokenShards(data_root / "train")
    val_all = TokenShards(data_root / "val") if (data_root / "val").is_dir() else None
    mcfg = make_config(cfg.model_size, vocab_size=train_all.vocab_size, **cfg.model)
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and world_size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    own = [e for e in range(cfg.n_experts) if e % world_size == rank]
    if rank == 0:
        atomic.remove_stale(out)  # a killed run's half-written files (other ranks write after the barrier below)
        prev = out / "config.json"
        if prev.is_file():
            try:
                old = _flat(json.loads(prev.read_text())["config"])
            except (ValueError, KeyError, TypeError) as e:  # empty or cut short by a kill outside atomic writes
                raise ValueError(f"{prev}: unreadable gm config ({e}); use a new out_dir or delete it") from e
            new = _flat(json.loads(json.dumps(cfg.to_dict())))
            dflt = _flat(json.loads(json.dumps(GMConfig().to_dict())))  # a setting newer than the gm: its default
            if changed := sorted(k for k, v in new.items()
                                 if k.split(".")[-1] not in FREE and old.get(k, dflt.get(k)) != v):
                raise ValueError(f"{prev}: this gm was made with other {changed}; use a new out_dir")
        atomic.write_json(prev, {"config": cfg.to_dict(), "model_config": asdict(mcfg)})
        if not _round_done(out, 0):
            fresh = make_router(cfg.router, cfg.n_experts, train_all.vocab_size, **{"seed": cfg.seed, **cfg.router_cfg})
            if router is None:
                router, assign = fresh.fit(train_all), None
            elif router.cfg != fresh.cfg:
                raise ValueError(f"train_gm: the given router's settings {router.cfg} are not this gm's {fresh.cfg}")
            if cfg.train_top_r > 1:  # column 0 is the top-1 assignment a caller may have passed
                assign = routing_cache.assign_top(router, train_all, cfg.train_top_r, routing)
            _route(router, data_root, out, 0, assign=assign, cache=routing)
    _barrier()
    t0 = time.perf_counter()
    rk = Rank(cfg, mcfg, out, dev, len(own), rank, verbose)
    routed0 = json.loads((out / "routed" / "round_000" / "done.json").read_text())
    tok_step = cfg.train.batch_size * cfg.train.grad_accum * mcfg.seq_len
    plan = plan_budget(cfg, tok_step, routed0["tokens"])
    branch, max_steps = plan["branch_step"], plan["max_steps"]
    seed_meta = None
    if branch and not cfg.seed_from and cfg.train.schedule == "wsd" and \
            branch > stable_until(cfg.train, plan["total_steps"]):
        raise ValueError(f"GMConfig: the branch step {branch} lies in the twin's decay (from step "
                         f"{stable_until(cfg.train, plan['total_steps'])}); need seed_fraction <= 1 - decay_frac")
    if branch and cfg.train.schedule == "cosine" and cfg.n_experts > 1:
        warnings.warn("train_gm: branching under a cosine schedule: each expert's cosine runs over its own "
                      "branch + own steps, so its learning rate drops at the branch; schedule 'wsd' continues it")
    if branch:
        if rank == 0 and not rk.record_path(SEED).is_file():
            if cfg.seed_from:
                import_seed(rk, branch_path(cfg.seed_from, branch), branch, plan["total_steps"], tok_step)
            else:  # the dense twin's own start (gmlib.train.setup): its init, data order and budget
                rk.phase({SEED: job(rk, train_all, val_all, plan["total_steps"], cfg.seed,
                                     lambda: fresh_state(mcfg, cfg.seed), stop=branch, keep_optimizer=True)},
                         {SEED: branch})
        _barrier()
        seed_meta = json.loads(rk.record_path(SEED).read_text())
        seed_tensors = rk.store.read(SEED)[0]
    phases = cfg.refine_rounds + 1
    sample_idx = _refine_sample(train_all, cfg.refine_docs, cfg.seed) if cfg.refine_rounds else None
    for p in range(phases):
        r = max(q for q in range(p + 1) if _round_done(out, q))
        rd = out / "routed" / f"round_{r:03d}"
        jobs = {}
        for e in own:
            init = ((lambda: branch_state(seed_tensors, seed_meta)) if branch
                    else (lambda e=e: fresh_state(mcfg, _seed(cfg.seed, 1, e))))
            # expert 0 goes on with the seed's stream of batches (so a one-expert gm IS its dense twin);
            # the others draw their own, so experts that share documents (train_top_r > 1) still differ
            data_seed = seed_meta.get("data_seed", cfg.seed) if branch and e == 0 else _seed(cfg.seed, 2, e)
            # wsd: the expert decays over the last decay_frac of its own trajectory (seed + own steps),
            # as its twin does, but never before its branch point
            decay = min(cfg.train.decay_frac, plan["own_steps"][e] / max_steps[e]) if branch else None
            val = TokenShards(rd / "val" / expert_name(e)) if (rd / "val").is_dir() else None
            jobs[expert_name(e)] = job(rk, TokenShards(rd / "train" / expert_name(e)), val, max_steps[e],
                                        data_seed, init, decay_frac=decay)
        rk.phase(jobs, {expert_name(e): branch + math.ceil(plan["own_steps"][e] * (p + 1) / phases) for e in own})
        if p == phases - 1:
            break
        loss_dir = out / "refine" / f"round_{p + 1:03d}"
        loss_dir.mkdir(parents=True, exist_ok=True)
        docs = [train_all.doc(i) for i in sample_idx]
        for e in own:
            if not (loss_dir / f"{expert_name(e)}.npy").is_file():
                rk.loss_column(expert_name(e), docs, loss_dir / f"{expert_name(e)}.npy")
        _barrier()
        if rank == 0 and not _round_done(out, p + 1):
            router = load_router(out / "router" / f"round_{r:03d}")
            losses = np.stack([np.load(loss_dir / f"{expert_name(e)}.npy") for e in range(cfg.n_experts)], axis=1)
            moved = router.refine(docs, losses)
            full = router.assign(train_all, scores=routing_cache.assign_scores(router, train_all, routing))
            full[sample_idx] = moved
            _route(router, data_root, out, p + 1, assign=full, cache=routing)
        _barrier()
    with rk.clock.part("sync"):
        rk.store.flush()
    wall = time.perf_counter() - t0
    mine = {"rank": rank, "world_size": world_size, "experts": [expert_name(e) for e in own], "device": str(dev),
            "wall_s": wall, "store": rk.store.summary(), "trainer_wait": rk.clock.summary()}
    rk.store.close()
    atomic.write_json(out / "ranks" / f"rank_{rank:03d}.json", mine)
    _barrier()
    if rank != 0:
        return mine
    final = max(r for r in range(cfg.refine_rounds + 1) if _round_done(out, r))
    summary = summarize(cfg, mcfg, out, world_size, plan, seed_meta, final)
    atomic.write_json(out / "gm.json", summary)
    return summary


