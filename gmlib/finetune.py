"""Few-shot fine-tuning on shop reviews: the learning curve of the article's Figure 3. The reviews, their
nested subsets and held-out scores are gmlib.shop_reviews.

Fine-tuning (both arms: the same steps, learning-rate grid, batch, schedule and stopping rule):
  dense  every weight of the pre-trained dense model;
  gm     the router votes on the training subset (argmax of its scores per review); the top_k
         experts by votes are fine-tuned, the others stay as pre-trained: the article's argument
         that adapting gm is cheap. The evaluated model is the gm mixture (gmlib.mixture) with
         the fine-tuned experts substituted, its prior the task prior (votes + 1/2, normalised),
         top eval_k of it, Hedge weights along each review.
Training is gmlib.train's loop on random windows of the subset's token stream; every
`eval_every` steps the validation slice's bits per byte is measured and the best state is kept.
Fine-tuned experts are saved through the gm's expert store under NEW names (<expert>.ft-<tag>);
the pre-trained experts' files are never written.
"""
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from .checkpoint import state_tensors
from .data import ShardWriter, TokenShards, WindowSampler
from .eval_docs import EvalDoc
from .evaluate import doc_nats
from .lm import SingleLM
from .mixture import MixtureConfig, MixtureLM
from .shop_reviews import KB, encode, heldout_scores, nested_subsets
from .train import TrainConfig, Trainer


# ---------------------------------------------------------------------------------------------
# fine-tuning


@dataclass
class FinetuneConfig:
    steps: int = 200                 # optimizer steps of every run, both arms
    lrs: tuple = (1e-4, 3e-4, 1e-3)  # the grid; the best (lr, step) by validation-slice bpb is kept
    min_lr_frac: float = 0.1         # cosine from lr down to lr * min_lr_frac over `steps`
    warmup_steps: int = 10
    batch_size: int = 8
    seq_len: int | None = None       # training window; None: the model's context
    weight_decay: float = 0.0        # fine-tuning: keep close to the pre-trained weights
    grad_clip: float = 1.0
    eval_every: int = 25             # validation-slice checks (and held-out curve points)
    val_every: int = 10              # 1 review in val_every of each subset is its validation slice
    top_k: int = 1                   # gm: experts fine-tuned
    eval_k: int | None = None        # gm: experts in the evaluated mixture (None: top_k)
    device: str = "cpu"

    def __post_init__(self):
        self.lrs = tuple(self.lrs)
        if self.steps < 1 or self.eval_every < 1 or not self.lrs or self.val_every < 2 or self.top_k < 1:
            raise ValueError(f"bad FinetuneConfig {self}")


@dataclass
class Arm:
    """What one fine-tuning run trains and how it is evaluated."""
    name: str
    models: dict                     # key -> pre-trained GPT (copied before training)
    make_lm: Callable                # {key: GPT} -> the evaluated model (gmlib.lm interface)
    info: dict = field(default_factory=dict)


def dense_arm(model) -> Arm:
    return Arm("dense", {"dense": model}, lambda m: SingleLM(m["dense"]))


def gm_arm(gm, train_docs: list[EvalDoc], top_k: int = 1, eval_k: int | None = None, name: str = "gm") -> Arm:
    """gm: a gmlib.serve.LoadedGM. The router's votes on the training reviews pick the experts to
    fine-tune and give the mixture its task prior."""
    E = gm.n_experts
    # the score that assigned the training documents (balancing bias included), as the mixture's prior
    scores = np.asarray(gm.router.prefix_scores([d.tokens for d in train_docs]))
    votes = np.bincount(scores.argmax(1), minlength=E)
    prior = (votes + 0.5) / (votes.sum() + 0.5 * E)
    chosen = [int(e) for e in np.argsort(-prior, kind="stable")[:top_k]]
    mc = MixtureConfig(k=min(E, eval_k or top_k), reroute_every=0)  # no router: the task prior throughout

    def make_lm(tuned):
        return MixtureLM(lambda e: tuned[e] if e in tuned else gm.expert(e), E, None, mc, base_prior=prior,
                         expert_n_params=gm.params_per_expert)
    return Arm(name, {e: copy.deepcopy(gm.expert(e)) for e in chosen}, make_lm,
               {"experts": [gm.experts[e] for e in chosen], "votes": votes.tolist(), "prior": prior.tolist()})


def slice_bpb(lm, docs: list[EvalDoc]) -> float:
    return float(doc_nats(lm, docs).sum() / math.log(2) / sum(d.nbytes for d in docs))


def token_shards(docs: list[EvalDoc], vocab_size: int, root) -> TokenShards:
    with ShardWriter(root, vocab_size, ["reviews"]) as w:
        for d in docs:
            w.add(d.tokens, nbytes=d.nbytes)
    return TokenShards(root)


def finetune(arm: Arm, shards: TokenShards, val_docs, cfg: FinetuneConfig, lr: float, seed: int,
             curve_docs=None, n_boot: int = 200):
    """Fine-tune the arm's models (copies) for cfg.steps at `lr`. Returns (models at the step of
    lowest validation-slice bpb, record, held-out curve rows if curve_docs are given)."""
    models = {k: copy.deepcopy(m) for k, m in arm.models.items()}
    L = min(m.cfg.seq_len for m in models.values())
    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, min_lr=lr * cfg.min_lr_frac,
                       warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                       eval_every=0, log_every=cfg.eval_every, device=cfg.device, seed=seed)
    T = min(cfg.seq_len or L, L)
    if shards.n_tokens <= T + 1:
        raise ValueError(f"a training subset of {shards.n_tokens} tokens is too small for windows of {T + 1}: "
                         "lower FinetuneConfig.seq_len or take a larger subset")
    sampler = WindowSampler(shards, T, cfg.batch_size, seed=seed)
    trainers = [Trainer(m, tcfg, sampler) for m in models.values()]
    curve = []

    def check(step):
        lm = arm.make_lm(models)
        if curve_docs is not None:
            q = heldout_scores(lm, curve_docs, n_boot)
            curve.append({"model": arm.name, "lr": lr, "step": step,
                          **{k: q[k] for k in ("val_ppl", "val_bpb", "text_bpb")}})
        return slice_bpb(lm, val_docs)

    def snap():
        return {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in models.items()}

    best = (check(0), 0, snap())
    while trainers[0].step < cfg.steps:
        for tr in trainers:
            tr.run(cfg.eval_every, progress=False)
        v = check(trainers[0].step)
        if v < best[0]:
            best = (v, trainers[0].step, snap())
    for k, m in models.items():
        m.load_state_dict(best[2][k])
        m.eval()
    rec = {"lr": lr, "steps": best[1], "slice_bpb": best[0], "train_seconds": sum(t.acct["seconds"] for t in trainers),
           "train_tokens": sum(t.acct["tokens"] for t in trainers),
           "params_trained": sum(m.cfg.n_params for m in models.values())}
    return models, rec, curve


def save_experts(gm, tuned: dict, tag: str, meta: dict) -> list[str]:
    """Put fine-tuned experts into the gm's store as new experts <expert>.ft-<tag> (weights
    only); refuses a name that is a pre-trained expert's. gm: a gmlib.serve.LoadedGM."""
    names = []
    for e, m in tuned.items():
        name = f"{gm.experts[e]}.ft-{tag}"
        if name in gm.experts:
            raise ValueError(f"{name}: would overwrite a pre-trained expert")
        gm.store.put(name, state_tensors(m), {"base": gm.experts[e], **meta}, keep_optimizer=False, durable=True)
        names.append(name)
    gm.store.flush()
    return names


def fit_point(arm: Arm, train_docs, val_docs, held_docs, cfg: FinetuneConfig, seed: int, curve: bool = False,
              n_boot: int = 1000):
    """One point of the learning curve: the best run of the lr grid, scored on the held-out
    reviews. Returns (record, fine-tuned models, their LM, held-out curve rows of the chosen lr)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gm-ft-") as tmp:
        shards = token_shards(train_docs, next(iter(arm.models.values())).cfg.vocab_size, tmp)
        best = None
        for lr in sorted(cfg.lrs):  # ties go to the smaller lr
            run = finetune(arm, shards, val_docs, cfg, lr, seed, held_docs if curve else None)
            if best is None or run[1]["slice_bpb"] < best[1]["slice_bpb"]:
                best = run
    models, rec, rows = best
    lm = arm.make_lm(models)
    rec = {"steps": rec.pop("steps"), **heldout_scores(lm, held_docs, n_boot), **rec,
           "experts": ",".join(arm.info.get("experts", [])), "seconds": round(time.time() - t0, 2)}
    return rec, models, lm, rows


def learning_curve(dense, gm, pool, heldout, tokenizer, cfg: FinetuneConfig, sizes_kb, seeds, curve_kb=None,
                   n_boot: int = 1000, save: str = "largest", log=print):
    """Every (model, subset, seed) point. dense: a GPT or None; gm: a gmlib.serve.LoadedGM or
    None. save: which fine-tuned gm experts go to the store (all, largest,
    none). Returns (points, steps curve of curve_kb at the first seed, {model: fine-tuned LM of
    the largest subset, first seed}). Rows with subset_kb 0 are the models before fine-tuning
    (gm with the smallest subset's task prior)."""
    pool_docs, held_docs = encode(pool, tokenizer), encode(heldout, tokenizer)
    points, curves, final = [], [], {}
    largest, curve_kb = sizes_kb[-1], curve_kb or sizes_kb[-1]
    for seed in seeds:
        for s, (tr_idx, val_idx) in nested_subsets(pool, sizes_kb, seed, cfg.val_every).items():
            train_docs, val_docs = [pool_docs[i] for i in tr_idx], [pool_docs[i] for i in val_idx]
            nbytes = sum(d.nbytes for d in train_docs + val_docs)
            kb = round(nbytes / KB) if s == "all" else s
            arms = ([dense_arm(dense)] if dense is not None else []) + \
                   ([gm_arm(gm, train_docs, cfg.top_k, cfg.eval_k)] if gm is not None else [])
            for arm in arms:
                if s == sizes_kb[0] and (seed == seeds[0] or arm.name != "dense"):  # before fine-tuning
                    q = heldout_scores(arm.make_lm(arm.models), held_docs, n_boot)
                    points += [{"model": arm.name, "subset_kb": 0, "seed": sd, "steps": 0, **q,
                                "experts": ",".join(arm.info.get("experts", []))}
                               for sd in (seeds if arm.name == "dense" else [seed])]
                first = seed == seeds[0]
                rec, models, lm, rows = fit_point(arm, train_docs, val_docs, held_docs, cfg, seed,
                                                  first and s == curve_kb, n_boot)
                row = {"model": arm.name, "subset_kb": kb, "seed": seed, **rec, "actual_kb": nbytes / KB,
                       "n_reviews": len(train_docs) + len(val_docs)}
                if arm.name != "dense" and (save == "all" or (save == "largest" and s == largest)):
                    meta = {k: row[k] for k in ("subset_kb", "seed", "steps", "lr", "val_ppl", "val_bpb")}
                    row["saved_as"] = ",".join(save_experts(gm, models, f"reviews-{kb:g}kb-s{seed}", meta))
                points.append(row)
                curves += [{**c, "subset_kb": kb, "seed": seed} for c in rows]
                if s == largest and first:
                    final[arm.name] = lm
                log(f"{arm.name:>5} {kb:>6g} KB seed {seed}: lr {row['lr']:.0e} step {row['steps']:>4}  "
                    f"held-out ppl {row['val_ppl']:.2f} bpb {row['val_bpb']:.4f}  ({row['seconds']:.1f} s)")
    return pd.DataFrame(points), pd.DataFrame(curves), final


# ---------------------------------------------------------------------------------------------
# the record


def summary(points: pd.DataFrame) -> pd.DataFrame:
    """Points averaged over seeds: mean and standard deviation (ddof 1; 0 for one seed)."""
    g = points.groupby(["model", "subset_kb"], sort=True)
    out = g.agg(n_seeds=("seed", "nunique"), steps=("steps", "mean"), val_ppl=("val_ppl", "mean"),
                val_ppl_std=("val_ppl", "std"), val_bpb=("val_bpb", "mean"), val_bpb_std=("val_bpb", "std"),
                text_bpb=("text_bpb", "mean"), text_bpb_std=("text_bpb", "std"))
    return out.fillna(0.0).reset_index()


def figure(points: pd.DataFrame, curve: pd.DataFrame):
    """Held-out ppl, bpb and the review texts' bpb against fine-tuning data (log x; before
    fine-tuning dashed), and held-out ppl against fine-tuning steps for one subset size."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0, 0], "val_ppl", "held-out perplexity per token"),
              (axes[0, 1], "val_bpb", "held-out bits per byte"),
              (axes[1, 0], "text_bpb", "bits per byte of the review texts (header given)")]
    for i, (model, g) in enumerate(summary(points).groupby("model")):
        color, ft = f"C{i}", g[g.subset_kb > 0]
        for ax, col, label in panels:
            ax.errorbar(ft.subset_kb, ft[col], yerr=ft[f"{col}_std"], marker="o", capsize=3, color=color, label=model)
            if (g.subset_kb == 0).any():
                ax.axhline(g[g.subset_kb == 0][col].iloc[0], ls="--", color=color, alpha=0.6,
                           label=f"{model}, before fine-tuning")
            ax.set_xscale("log")
            ax.set_xticks(ft.subset_kb, [f"{v:g}" for v in ft.subset_kb])  # the subset sizes, not powers of 10
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel("fine-tuning data (KB of reviews, log scale)")
            ax.set_ylabel(label)
        c = curve[curve.model == model] if len(curve) else curve
        if len(c):
            axes[1, 1].plot(c.step, c.val_ppl, "o-", color=color,
                            label=f"{model} ({c.subset_kb.iloc[0]:g} KB, lr {c.lr.iloc[0]:.0e})")
    axes[1, 1].set_xlabel("fine-tuning step")
    axes[1, 1].set_ylabel("held-out perplexity per token")
    axes[1, 1].set_yscale("log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Few-shot fine-tuning on Wildberries reviews (error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    return fig
