"""One rank of gm's trainer: the slots its experts borrow, their segments and phases, and the jobs
(an expert's run or the seed's) that the segments advance.

A rank holds group_size slots, each a GPT with its AdamW and its step machinery (gmlib.step.
TrainStep: device, fp8, compiled forward), built once. A segment loads an expert from the store
(gmlib.store) into a slot, trains it as a gmlib.train.Trainer that borrows the slot's machinery and
starts from the expert's RunState (kept in the store entry's meta as "trainer"), and puts it back
durably; with group_size > 1 several slots train together as one fused model (gmlib.fused). The
rank's clock (gmlib.clock) times every part of a segment. The schedule of jobs, routing and
budgets are gmlib.gm's.
"""
import os
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import atomic
from .checkpoint import load_state_tensors, read_checkpoint, state_tensors
from .clock import Clock
from .data import TokenShards, WindowSampler
from .expert_buffers import buffer_bytes
from .fused import GroupTrainer
from .mixture import window_logprobs
from .model import GPT, GPTConfig
from .store import ExpertStore
from .train import VAL_SEED, Trainer, TrainConfig, TrainStep, stable_until

SEED = "seed"  # the store name of the shared BTM seed run


def state_bytes(mcfg: GPTConfig) -> int:
    """One training expert's size in the store: its weights and AdamW state (two moments and a step
    per parameter, named as gmlib.checkpoint.state_tensors names them) laid out as the store lays
    them out. The shapes are asked of a GPT on the meta device (no memory). A benchmark sizes the
    GPU tier (gpu_bytes) in expert states with it."""
    with torch.device("meta"):
        model = GPT(mcfg)
        step = torch.empty(())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, p in model.named_parameters():
        tensors.update({f"optim.{k}.exp_avg": p, f"optim.{k}.exp_avg_sq": p, f"optim.{k}.step": step})
    return buffer_bytes(tensors)


class Rank:
    """One rank's machinery for a gmlib.gm.GMConfig `cfg`: group_size slots (a GPT, its AdamW and its
    TrainStep each) that the experts it trains borrow in turn (slot 0 alone when group_size is 1),
    the store of its experts and its clock."""

    def __init__(self, cfg, mcfg: GPTConfig, out: Path, dev: torch.device, n_own: int, rank: int,
                 verbose: bool):
        self.cfg, self.mcfg, self.out, self.rank, self.verbose = cfg, mcfg, out, rank, verbose
        self.tcfg = replace(cfg.train, device=str(dev))
        one = state_bytes(mcfg)
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # the GPU tier's default: the group in training and the next group, prefetched
        self.store = ExpertStore(out / "store", cfg.ram_bytes or max(one, min((n_own + 2) * one, phys // 2)),
                                 cfg.gpu_bytes or 2 * cfg.group_size * one, dev)
        torch.manual_seed(cfg.seed)
        # the step machinery of each slot (device, fp8, AdamW, compiled forward), built once and lent to
        # every segment of the experts that pass through the slot
        self.machines = [TrainStep(GPT(mcfg), self.tcfg) for _ in range(cfg.group_size)]
        self.models = [m.model for m in self.machines]
        self.opts = [m.optimizer for m in self.machines]
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
        tr = Trainer(self.machines[slot], job.tcfg, job.train, job.val, state=meta.get("trainer"))
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


def job(rank: Rank, train: TokenShards, val: TokenShards | None, max_steps: int, data_seed: int, init,
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


def fresh_state(mcfg, seed):
    torch.manual_seed(seed)
    return {f"model.{k}": v for k, v in GPT(mcfg).state_dict().items()}, {}


def branch_state(seed_tensors: dict, seed_meta: dict):
    """An expert's starting state at the branch point: the seed's weights and AdamW moments (with
    their step counts), and its trainer step and data position; its own accounting starts at
    zero (the seed's compute is counted once, in the seed's record)."""
    t = seed_meta["trainer"]
    return dict(seed_tensors), {"trainer": {"step": t["step"], "data_pos": t["data_pos"],
                                            "acct": {"tokens": 0, "seconds": 0.0, "eval_seconds": 0.0},
                                            "history": {k: [] for k in t["history"]}}}


# the settings that make a seed checkpoint this gm's: its trajectory up to the branch point
TWIN = ("batch_size", "grad_accum", "lr", "warmup_steps", "schedule", "betas", "grad_clip")


def import_seed(rk: Rank, path: Path, branch: int, total: int, tok_step: int) -> dict:
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
