"""gm's trainer: many ordinary experts, each trained alone on the documents routed to it.

Policy over mechanism: the router decides which documents each expert sees, the store keeps
every expert's weights and AdamW state on disk / in RAM / on the GPU, the Trainer runs the
ordinary loop. This module only decides the schedule:
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from . import atomic
from .checkpoint import load_state_tensors, state_tensors
from .data import TokenShards, WindowSampler
from .fused import GroupTrainer
from .mixture import window_logprobs
from .model import GPT, GPTConfig, make_config
from . import routing_cache
from .checkpoint import read_checkpoint
from .clock import PARTS, Clock
from .router import load_router, make_router
from .store import ExpertStore
from .train import (VAL_SEED, Trainer, TrainConfig, branch_path, branch_step, make_optimizer, resolve_device,
                    stable_until)

FORMAT = "gm-v1"
SEED = "seed"  # the store name of the shared BTM seed run
# settings a rerun into the same out_dir may change: they do not change what any expert learns
# (each expert's run is independent of the order of segments; compile and group_size change only
# the rounding); every other setting must stay
FREE = {"device", "gpu_bytes", "ram_bytes", "segment_steps", "group_size", "compile", "compile_mode", "eval_every",
        "log_every", "ckpt_every"}


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
    group_size: int = 1             # experts trained together as one fused model (gmlib.fused): small experts
    #                                 fill the GPU; 1: one at a time (large experts)
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
        """From a nested dict (as to_dict) or a flat one where TrainConfig fields sit beside ours."""
        d, own, tfields = dict(d), {f.name for f in fields(cls)}, {f.name for f in fields(TrainConfig)}
        train = d.pop("train", {})
        train = asdict(train) if isinstance(train, TrainConfig) else dict(train)
        train.update({k: d.pop(k) for k in list(d) if k not in own and k in tfields})
        if bad := sorted(set(d) - own):
            raise ValueError(f"unknown gm settings {bad}; known: {sorted(own | tfields)}")
        return cls(**d, train=TrainConfig(**train))

    def to_dict(self) -> dict:
        return asdict(self)


def expert_name(e: int) -> str:
    return f"expert_{e:03d}"


def _seed(*keys) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state_bytes(mcfg: GPTConfig) -> int:
    """Upper bound of one expert's store size: fp32 weights + two Adam moments + steps, each
    tensor aligned as the store lays it out (the shapes asked of a GPT on the meta device: no memory)."""
    with torch.device("meta"):
        sizes = [p.numel() for p in GPT(mcfg).parameters()]
    return sum(3 * (-(-4 * n // 256) * 256) + 256 for n in sizes)


state_bytes = _state_bytes  # public: a benchmark sizes the GPU tier (gpu_bytes) in expert states


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


class _Rank:
    """One rank's machinery: group_size GPTs, each with its AdamW, that the experts it trains borrow
    in turn (slot 0 alone when group_size is 1)."""

    def __init__(self, cfg: GMConfig, mcfg: GPTConfig, out: Path, dev: torch.device, n_own: int, rank: int,
                 verbose: bool):
        self.cfg, self.mcfg, self.out, self.rank, self.verbose = cfg, mcfg, out, rank, verbose
        self.tcfg = replace(cfg.train, device=str(dev))
        one = _state_bytes(mcfg)
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # the GPU tier's default: the group in training and the next group, prefetched
        self.store = ExpertStore(out / "store", cfg.ram_bytes or max(one, min((n_own + 2) * one, phys // 2)),
                                 cfg.gpu_bytes or 2 * cfg.group_size * one, dev)
        torch.manual_seed(cfg.seed)
        self.models = [GPT(mcfg).to(dev) for _ in range(cfg.group_size)]
        self.opts = [make_optimizer(m, self.tcfg, dev) for m in self.models]
        self.model = self.models[0]
        self.steps, self.done = {}, set()  # what is known of each expert without loading it
        self.finished = {}  # name -> record of an expert finished in the current phase, written at its end
        self.clock = Clock(dev)  # where the GPU waits for experts (gmlib.clock)

    def record_path(self, name):
        return self.out / "experts" / f"{name}.json"

    def _load(self, name, job, slot: int) -> tuple[dict, bool]:
        """Expert `name`'s state (or job.init()'s: its tensors and, for a branch, its trainer state)
        copied into slot `slot`; returns (meta, fresh). The clock counts fetch and load (init for a
        new expert)."""
        st, ck = self.store, self.clock
        fresh = name not in st
        with ck.part("init" if fresh else "fetch"):
            tensors, meta = job.init() if fresh else st.get(name)
        with ck.part("init" if fresh else "load"):
            load_state_tensors(self.models[slot], self.opts[slot], tensors)  # copies: the store's views may now expire
        return meta, fresh

    def _prefetch(self, names):
        with self.clock.part("fetch"):
            for n in names:  # loads while this segment trains
                if n in self.store:
                    self.store.prefetch(n)

    def _trainer(self, job, slot: int, meta: dict, fresh: bool) -> Trainer:
        tr = Trainer(self.models[slot], job.tcfg, job.train, job.val, optimizer=self.opts[slot])
        if meta.get("trainer"):
            tr.load_state_dict(meta["trainer"])
        if fresh and job.val:  # a branched expert's start is its seed's loss on this expert's documents
            with self.clock.part("eval"):
                meta["val_loss_start"] = tr.evaluate()
        return tr

    def _put(self, name, job, slot: int, tr: Trainer, meta: dict, before: int, acct: dict):
        """After a segment: the expert's state and record back to the store (durably)."""
        finished = tr.done or tr.step >= job.stop
        meta.update(trainer=tr.state_dict(), accounting=acct, done=finished, rank=self.rank, pid=os.getpid())
        if finished and job.val:  # run() validates a finished expert
            h = tr.history
            meta["val_loss"] = h["val_loss"][-1] if h["val_step"][-1:] == [tr.step] else tr.evaluate()
        if tr.step > before or finished:
            with self.clock.part("writeback"):
                self.store.put(name, state_tensors(self.models[slot], self.opts[slot]), meta, durable=True,
                               keep_optimizer=job.keep_optimizer or not finished)
        if self.verbose and tr.history["loss"]:
            val = f" val {meta['val_loss']:.3f}" if meta.get("val_loss") is not None else ""
            print(f"  {name}: step {tr.step}/{tr.max_steps} loss {tr.history['loss'][-1]:.3f}{val}", flush=True)

    def _record(self, name, meta: dict) -> dict:
        self.steps[name] = meta["trainer"]["step"]
        if meta["done"]:
            self.done.add(name)
            if not self.record_path(name).is_file():
                self.finished[name] = meta  # its record is written at the end of the phase (phase())
        return meta

    def _found(self, hits: dict, fresh: bool) -> str:
        """Where the store found what a segment loaded: new, or the slowest tier that served it."""
        now = self.store.stats.hits
        return "new" if fresh else next((k for k in ("disk", "ram", "dev") if now[k] > hits.get(k, 0)), "dev")

    def segment(self, name, job, target, nxt=()) -> dict:
        """Load expert `name` (or initialise it), train it toward step `target` for at most
        segment_steps, and put it back, prefetching the experts `nxt` meanwhile. A run ends at its
        budget or at job.stop (the seed: its branch step); the last segment stores weights only,
        unless job.keep_optimizer (the seed, which others continue). self.clock times its parts
        (fetch and load, or init; train, eval, writeback): a record a segment."""
        ck, hits = self.clock, dict(self.store.stats.hits)
        rec = ck.begin(expert=name)
        meta, fresh = self._load(name, job, 0)
        rec["found"] = self._found(hits, fresh)
        self._prefetch(nxt)
        tr = self._trainer(job, 0, meta, fresh)
        rec["step"] = tr.step
        if not meta.get("done"):
            before, ev = tr.step, tr.acct["eval_seconds"]
            with ck.part("train"):
                acct = tr.run(min(self.cfg.segment_steps, max(0, target - tr.step)), progress=False)
            ck.move("train", "eval", tr.acct["eval_seconds"] - ev)  # the validation inside run()
            self._put(name, job, 0, tr, meta, before, acct)
        rec["step_end"] = tr.step
        ck.end()
        return self._record(name, meta)

    def group_segment(self, names, jobs, targets, nxt=()) -> list[dict]:
        """segment() for several experts at once: loaded into the slots, trained together as one
        fused model (gmlib.fused), each toward its own target and budget, put back one by one. One
        clock record for the group (expert "a+b+...", its steps summed over the members)."""
        ck, hits = self.clock, dict(self.store.stats.hits)
        rec = ck.begin(expert="+".join(names))
        loaded = [self._load(n, jobs[n], slot) for slot, n in enumerate(names)]
        rec["found"] = self._found(hits, any(fresh for _, fresh in loaded))
        self._prefetch(nxt)
        trs = [self._trainer(jobs[n], slot, *loaded[slot]) for slot, n in enumerate(names)]
        rec["step"] = sum(tr.step for tr in trs)
        slots = [s for s, (meta, _) in enumerate(loaded) if not meta.get("done")]
        if slots:
            before = {s: trs[s].step for s in slots}
            ev = sum(trs[s].acct["eval_seconds"] for s in slots)
            steps = [min(self.cfg.segment_steps, max(0, targets[names[s]] - trs[s].step)) for s in slots]
            with ck.part("train"):
                accts = GroupTrainer([trs[s] for s in slots]).run(steps)
            ck.move("train", "eval", sum(trs[s].acct["eval_seconds"] for s in slots) - ev)
            for s, acct in zip(slots, accts):
                self._put(names[s], jobs[names[s]], s, trs[s], loaded[s][0], before[s], acct)
        rec["step_end"] = sum(tr.step for tr in trs)
        ck.end()
        return [self._record(n, meta) for n, (meta, _) in zip(names, loaded)]

    def phase(self, jobs: dict, targets: dict):
        """Round-robin segments until every expert reaches its target (or its budget), with group_size
        G > 1 in groups of G that train together (a lone expert trains alone); then, once, the store
        is flushed and the records of the experts finished in the phase are written (a record claims
        what is on disk; flushing at each expert's end would stall the GPU)."""
        self.done |= {n for n in jobs if self.record_path(n).is_file()}  # finished in an earlier run
        todo = [n for n in jobs if n not in self.done and self.steps.get(n, -1) < targets[n]]
        G = self.cfg.group_size
        while todo:
            groups = [todo[i:i + G] for i in range(0, len(todo), G)]
            for i, grp in enumerate(groups):
                nxt = groups[(i + 1) % len(groups)] if len(groups) > 1 else []
                if len(grp) == 1:
                    self.segment(grp[0], jobs[grp[0]], targets[grp[0]], nxt)
                else:
                    self.group_segment(grp, jobs, targets, nxt)
            todo = [n for n in todo if n not in self.done and self.steps[n] < targets[n]]
        if self.finished:
            with self.clock.part("sync"):
                self.store.flush()
            for n, meta in self.finished.items():
                atomic.write_json(self.record_path(n), {"name": n, **meta})
            self.finished = {}

    def loss_column(self, name, docs, path: Path):
        """Expert `name`'s own mean loss (nats/token) on each refinement document."""
        tensors, _ = self.store.get(name)
        load_state_tensors(self.model, None, {k: v for k, v in tensors.items() if k.startswith("model.")})
        T = self.mcfg.seq_len  # a document's first 4 contexts, windows without overlap: enough to rank experts
        lps = window_logprobs(self.model.eval(), [d[:4 * T] for d in docs], stride=T)
        col = np.array([-lp.mean() if len(lp) else 0.0 for lp in lps])
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, col)


def _job(rank: _Rank, train: TokenShards, val: TokenShards | None, max_steps: int, data_seed: int, init,
         stop: int | None = None, keep_optimizer: bool = False, decay_frac: float | None = None):
    T, bs = rank.mcfg.seq_len, rank.tcfg.batch_size
    try:  # an expert whose val shard is too small for one window gets no val loss
        vs = WindowSampler(val, T, bs, seed=VAL_SEED) if val is not None else None
    except ValueError:
        vs = None
    tcfg = replace(rank.tcfg, max_steps=max(1, max_steps), max_tokens=None, seed=data_seed,
                   decay_frac=rank.tcfg.decay_frac if decay_frac is None else decay_frac)
    return SimpleNamespace(tcfg=tcfg, train=WindowSampler(train, T, bs, seed=data_seed), val=vs, init=init,
                           stop=tcfg.max_steps if stop is None else stop, keep_optimizer=keep_optimizer)


def _fresh(mcfg, seed):
    torch.manual_seed(seed)
    return {f"model.{k}": v for k, v in GPT(mcfg).state_dict().items()}, {}


def _branch(seed_tensors: dict, seed_meta: dict):
    """An expert's starting state at the branch point: the seed's weights and AdamW moments (with
    their step counts), and its trainer step and data position; its own accounting starts at
    zero (the seed's compute is counted once, in the seed's record)."""
    t = seed_meta["trainer"]
    return dict(seed_tensors), {"trainer": {"step": t["step"], "data_pos": t["data_pos"],
                                            "acct": {"tokens": 0, "seconds": 0.0, "eval_seconds": 0.0},
                                            "history": {k: [] for k in t["history"]}}}


# the settings that make a seed checkpoint this gm's: its trajectory up to the branch point
TWIN = ("batch_size", "grad_accum", "lr", "warmup_steps", "schedule", "betas", "grad_clip")


def _import_seed(rk: _Rank, path: Path, branch: int, total: int, tok_step: int) -> dict:
    """Put a dense run's branch checkpoint into the store as the seed (weights and moments) and
    return its record; ValueError if it is not a state this gm's twin passes at `branch`."""
    tensors, meta = read_checkpoint(path, "cpu")
    tc, gm_tc = TrainConfig(**meta["train_config"]), rk.tcfg
    if GPTConfig(**meta["config"]) != rk.mcfg:
        raise ValueError(f"{path}: the seed's model {meta['config']} is not this gm's experts' {asdict(rk.mcfg)}")
    if bad := [k for k in TWIN if getattr(tc, k) != getattr(gm_tc, k)]:
        raise ValueError(f"{path}: the seed run's {bad} differ from this gm's: not its dense twin")
    ck_total, ck_tok = meta.get("max_steps"), tc.batch_size * tc.grad_accum * rk.mcfg.seq_len
    # a wsd state in its stable phase is the same in a run of any length; a cosine one only in its own length
    same = branch <= stable_until(tc, ck_total) if tc.schedule == "wsd" else ck_total == total
    if meta["step"] != branch or ck_tok != tok_step or not same:
        raise ValueError(f"{path}: a state at step {meta['step']} of a {tc.schedule} run of {ck_total} steps; this gm "
                         f"branches at step {branch} of {total} (in its stable phase for wsd, the same run for cosine)")
    rec = {"trainer": {k: meta[k] for k in ("step", "data_pos", "acct", "history")}, "accounting": meta["accounting"],
           "done": True, "rank": rk.rank, "pid": os.getpid(), "source": str(path), "data_seed": tc.seed,
           "weight_decay": tc.weight_decay}
    rk.store.put(SEED, tensors, rec, durable=True, keep_optimizer=True)
    rk.store.flush()
    atomic.write_json(rk.record_path(SEED), {"name": SEED, **rec})
    return rec


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
            if changed := sorted(k for k, v in new.items() if k.split(".")[-1] not in FREE and old.get(k, dflt.get(k)) != v):
                raise ValueError(f"{prev}: this gm was made with other {changed}; use a new out_dir")
        atomic.write_json(prev, {"config": cfg.to_dict(), "model_config": asdict(mcfg)})
        if not _round_done(out, 0):
            fresh = make_router(cfg.router, cfg.n_experts, train_all.vocab_size, **{"seed": cfg.seed, **cfg.router_cfg})
            if router is None:
                router, assign = fresh.fit(train_all), None
            elif router.cfg != fresh.cfg:
                raise ValueError(f"train_gm: the given router's settings {router.cfg} are not this gm's {fresh.cfg}")
            if cfg.train_top_r > 1:  # column 0 is the top-1 assignment a caller may have passed
                assign = router.assign_top(train_all, cfg.train_top_r)
            _route(router, data_root, out, 0, assign=assign, cache=routing)
    _barrier()
    t0 = time.perf_counter()
    rk = _Rank(cfg, mcfg, out, dev, len(own), rank, verbose)
    routed0 = json.loads((out / "routed" / "round_000" / "done.json").read_text())
    tok_step = cfg.train.batch_size * cfg.train.grad_accum * mcfg.seq_len
    plan = plan_budget(cfg, tok_step, routed0["tokens"])
    branch, max_steps = plan["branch_step"], plan["max_steps"]
    seed_meta = None
    if branch and not cfg.seed_from and cfg.train.schedule == "wsd" and branch > stable_until(cfg.train, plan["total_steps"]):
        raise ValueError(f"GMConfig: the branch step {branch} lies in the twin's decay (from step "
                         f"{stable_until(cfg.train, plan['total_steps'])}); need seed_fraction <= 1 - decay_frac")
    if branch and cfg.train.schedule == "cosine" and cfg.n_experts > 1:
        warnings.warn("train_gm: branching under a cosine schedule: each expert's cosine runs over its own "
                      "branch + own steps, so its learning rate drops at the branch; schedule 'wsd' continues it")
    if branch:
        if rank == 0 and not rk.record_path(SEED).is_file():
            if cfg.seed_from:
                _import_seed(rk, branch_path(cfg.seed_from, branch), branch, plan["total_steps"], tok_step)
            else:  # the dense twin's own start (gmlib.train.setup): its init, data order and budget
                rk.phase({SEED: _job(rk, train_all, val_all, plan["total_steps"], cfg.seed,
                                     lambda: _fresh(mcfg, cfg.seed), stop=branch, keep_optimizer=True)}, {SEED: branch})
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
            init = (lambda: _branch(seed_tensors, seed_meta)) if branch else (lambda e=e: _fresh(mcfg, _seed(cfg.seed, 1, e)))
            # expert 0 goes on with the seed's stream of batches (so a one-expert gm IS its dense twin);
            # the others draw their own, so experts that share documents (train_top_r > 1) still differ
            data_seed = seed_meta.get("data_seed", cfg.seed) if branch and e == 0 else _seed(cfg.seed, 2, e)
            # wsd: the expert decays over the last decay_frac of its own trajectory (seed + own steps),
            # as its twin does, but never before its branch point
            decay = min(cfg.train.decay_frac, plan["own_steps"][e] / max_steps[e]) if branch else None
            val = TokenShards(rd / "val" / expert_name(e)) if (rd / "val").is_dir() else None
            jobs[expert_name(e)] = _job(rk, TokenShards(rd / "train" / expert_name(e)), val, max_steps[e],
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
            full = router.assign(train_all)
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
    summary = summarize(cfg, mcfg, out, world_size, plan, seed_meta)
    atomic.write_json(out / "gm.json", summary)
    return summary


ADDITIVE = ("tokens", "gpu_seconds", "eval_seconds", "flops_6nd", "flops")


def summarize(cfg, mcfg, out: Path, world_size, plan: dict, seed_meta: dict | None) -> dict:
    """gm.json: config, experts with their shares, steps and val losses, and compute summed over
    experts (and the seed run) in the dense trainer's terms, plus the store's swap accounting and, from
    each rank's clock (gmlib.clock), the time its GPU waited for experts (trainer_wait_s, _frac, _parts).
    An expert's `steps` counts from the start of its trajectory (the seed's steps included);
    `own_steps` are the ones it trained itself."""
    shares, max_steps, branch = plan["shares"], plan["max_steps"], plan["branch_step"]
    seed_acct = seed_meta["accounting"] if seed_meta else None
    final = max(r for r in range(cfg.refine_rounds + 1) if _round_done(out, r))
    routed = json.loads((out / "routed" / f"round_{final:03d}" / "done.json").read_text())
    records = []
    for e in range(cfg.n_experts):
        m = json.loads((out / "experts" / f"{expert_name(e)}.json").read_text())
        records.append({"name": expert_name(e), "expert": e, "rank": m["rank"], "pid": m["pid"], "share": float(shares[e]),
                        "budget_tokens": int(plan["budget_tokens"][e]), "max_steps": max_steps[e], "steps": m["trainer"]["step"],
                        "branch_step": branch, "own_steps": m["trainer"]["step"] - branch,
                        "docs_final": routed["docs"][e], "val_loss_start": m.get("val_loss_start"),
                        "val_loss": m.get("val_loss"), "accounting": m["accounting"], "history": m["trainer"]["history"]})
    accts = [r["accounting"] for r in records] + ([seed_acct] if seed_acct else [])
    acct = {k: sum(a[k] for a in accts) for k in ADDITIVE}
    acct.update(step=acct["tokens"] // (cfg.train.batch_size * cfg.train.grad_accum * mcfg.seq_len),  # seed's included
                params=cfg.n_experts * mcfg.n_params, params_per_expert=mcfg.n_params, params_active=mcfg.n_params,
                flops_per_token=mcfg.flops_per_token(), tokens_per_s=acct["tokens"] / acct["gpu_seconds"] if acct["gpu_seconds"] else 0.0,
                device=accts[0]["device"], seed_run=seed_acct)
    ranks = [json.loads((out / "ranks" / f"rank_{r:03d}.json").read_text()) for r in range(world_size)]
    moved = lambda s: s["bytes_to_dev"] + s["bytes_to_ram"] + s["bytes_to_disk"] + s["bytes_from_disk"]  # noqa: E731
    swap = {"bytes_moved": sum(moved(r["store"]) for r in ranks), "copy_s": sum(r["store"]["copy_s"] for r in ranks),
            "wait_s": sum(r["store"]["wait_s"] for r in ranks), "wall_s": max(r["wall_s"] for r in ranks)}
    swap["wait_frac"] = max(r["store"]["wait_s"] / r["wall_s"] if r["wall_s"] else 0.0 for r in ranks)
    # the trainer's own clock (gmlib.clock): time the GPU waited for experts in its segments, by part
    waits = [r["trainer_wait"] for r in ranks if "trainer_wait" in r]  # a rank record of older code has none
    if waits:
        swap.update(trainer_wait_s=sum(w["trainer_wait_s"] for w in waits),
                    trainer_wait_frac=max(w["trainer_wait_frac"] for w in waits),
                    trainer_parts={f"{p}_s": sum(w[f"{p}_s"] for w in waits) for p in (*PARTS, "other")})
    seed = None if seed_meta is None else {
        "step": branch, "source": seed_meta.get("source", "trained here"), "val_loss": seed_meta.get("val_loss"),
        "history": seed_meta["trainer"]["history"]}
    return {"format": FORMAT, "config": cfg.to_dict(), "model_config": asdict(mcfg), "router": cfg.router,
            "schedule": cfg.train.schedule, "seed_fraction": branch / plan["total_steps"], "train_top_r": cfg.train_top_r,
            "total_steps": plan["total_steps"], "branch_step": branch, "seed": seed,
            "router_path": f"router/round_{final:03d}", "n_experts": cfg.n_experts,
            "experts": [r["name"] for r in records], "world_size": world_size, "shares": [float(s) for s in shares],
            "val_loss": [r["val_loss"] for r in records], "records": records, "accounting": acct,
            "swap": swap, "ranks": ranks}
