"""Few-shot fine-tuning on shop reviews: the learning curve of the article's Figure 3.

Data. A review becomes one document, "Оценка: 4 из 5\\nТовар: <product>\\n<text>", so a generated
review can be prompted with a star rating. The held-out set is fixed by a hash of the review's
text (duplicated texts fall on the same side, so none is both trained on and scored). The rest,
the pool, is shuffled by a seed and cut into NESTED training subsets: subset s is the shortest
prefix of the shuffled pool holding at least s KB (1 KB = 1000 bytes of UTF-8 documents), so a
larger subset contains every smaller one. Every `val_every`-th review of that order is the
subset's validation slice (nested too); the learning rate and the stopping step are chosen on
it, never on the held-out set.

Fine-tuning (both arms: the same steps, learning-rate grid, batch, schedule and stopping rule):
  dense  every weight of the pre-trained dense model;
  gm     the router votes on the training subset (argmax of its scores per review); the top_k
         experts by votes are fine-tuned, the others stay as pre-trained: the article's argument
         that adapting gm is cheap. The evaluated model is the gm mixture (gmlib.mixture) with
         the fine-tuned experts substituted, its prior the task prior (votes + 1/2, normalised),
         top eval_k of it, Hedge weights along each review.
Training is gmlib.train's loop on random windows of the subset's token stream; every
`eval_every` steps the validation slice's bits per byte is measured and the best state is kept.
Held-out perplexity and bits per byte come from gmlib.evaluate.quality: the same computation as
every other evaluation. Fine-tuned experts are saved through the gm's expert store under NEW
names (<expert>.ft-<tag>); the pre-trained experts' files are never written.
"""
import copy
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .checkpoint import state_tensors
from .data import ShardWriter, TokenShards, WindowSampler
from .evaluate import EvalDoc, doc_nats, generate_texts, quality, read_jsonl
from .mixture import MixtureConfig, MixtureLM, SingleLM
from .train import TrainConfig, Trainer

KB = 1000


# ---------------------------------------------------------------------------------------------
# reviews


def load_reviews(path, clean_fn=None) -> list[dict]:
    """{id, text, rating (1-5 or None), product, category} per review of a JSONL(.gz) file.
    clean_fn(text) -> cleaned text (the notebook passes data_prep's cleaner); a review whose
    text is empty after cleaning is skipped (the Wildberries dump has rating-only reviews), a
    record without a "text" string is an error naming the file and line."""
    out = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{n}: no \"text\" string field in the review")
        text = (clean_fn(rec["text"]) if clean_fn else rec["text"]) or ""
        if not text.strip():
            continue
        rating = rec.get("rating")
        out.append({"id": str(rec.get("id", f"line-{n}")), "text": text.strip(),
                    "rating": int(rating) if isinstance(rating, (int, float)) and 1 <= rating <= 5 else None,
                    "product": str(rec.get("product_name") or "").strip(), "category": str(rec.get("category") or "")})
    if not out:
        raise ValueError(f"{path}: no review with text")
    return out


def review_prompt(rating: int | None, product: str = "") -> str:
    """The header of a review document: what a generation is prompted with."""
    head = ([f"Оценка: {rating} из 5"] if rating else []) + ([f"Товар: {product}"] if product else [])
    return "".join(h + "\n" for h in head)


def format_review(r: dict) -> str:
    return review_prompt(r["rating"], r["product"]) + r["text"]


def _unit(text: str, salt: str) -> float:
    """A uniform number in [0, 1) from a salted hash: the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(f"{salt}\0{text}".encode()).digest()[:8], "big") / 2.0 ** 64


def split_heldout(reviews: list[dict], frac: float = 0.1, max_heldout: int | None = None):
    """(pool, heldout): a review is held out when the hash of its text is below frac. With
    max_heldout, the held-out reviews of the smallest hashes (a fixed subsample)."""
    h = np.array([_unit(r["text"], "reviews-heldout") for r in reviews])
    held = np.flatnonzero(h < frac)
    held = held[np.argsort(h[held], kind="stable")][:max_heldout]
    pool = np.flatnonzero(h >= frac)
    return [reviews[i] for i in pool], [reviews[i] for i in held]


def nested_subsets(pool: list[dict], sizes_kb, seed: int, val_every: int = 10) -> dict:
    """{size: (train indices, validation-slice indices)} into pool. size is a number of KB or
    "all" (the whole pool). Nested: every subset is a prefix of one seeded order of the pool."""
    order = np.random.default_rng([seed, 17]).permutation(len(pool))
    cum = np.cumsum([len(format_review(pool[i]).encode()) for i in order])
    out = {}
    for s in sizes_kb:
        if s == "all":
            n = len(order)
        elif isinstance(s, (int, float)) and 0 < s * KB <= cum[-1]:
            n = int(np.searchsorted(cum, s * KB)) + 1
        else:
            raise ValueError(f"subset size {s!r}: need a positive number of KB up to the pool's "
                             f"{cum[-1] / KB:.0f} KB, or 'all'")
        is_val = np.arange(n) % val_every == val_every - 1
        if not is_val.any() or is_val.all():
            raise ValueError(f"subset of {s} KB has {n} reviews: too few for a validation slice of 1 in {val_every}")
        out[s] = (order[:n][~is_val], order[:n][is_val])
    return out


def encode(reviews: list[dict], tokenizer) -> list[EvalDoc]:
    """[bos] + tokens of each formatted review, with its UTF-8 bytes and words (for bpb, ppl)."""
    bos, texts = tokenizer.bos_id(), [format_review(r) for r in reviews]
    return [EvalDoc(np.array([bos] + ids, np.int64), len(t.encode()), len(t.split()))
            for t, ids in zip(texts, tokenizer.encode(texts))]


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
    make_lm: Callable                # {key: GPT} -> the evaluated model (gmlib.mixture interface)
    info: dict = field(default_factory=dict)


def dense_arm(model) -> Arm:
    return Arm("dense", {"dense": model}, lambda m: SingleLM(m["dense"]))


def gm_arm(gm, train_docs: list[EvalDoc], top_k: int = 1, eval_k: int | None = None, name: str = "gm") -> Arm:
    """gm = (router, load_expert, info) of gmlib.gm.load_gm. The router's votes on the training
    reviews pick the experts to fine-tune and give the mixture its task prior."""
    router, load_expert, info = gm
    E = info["n_experts"]
    scores = np.asarray(router.scores([d.tokens for d in train_docs]))
    votes = np.bincount(scores.argmax(1), minlength=E)
    prior = (votes + 0.5) / (votes.sum() + 0.5 * E)
    chosen = [int(e) for e in np.argsort(-prior, kind="stable")[:top_k]]
    mc = MixtureConfig(k=min(E, eval_k or top_k), reroute_every=0)  # no router: the task prior throughout

    def make_lm(tuned):
        return MixtureLM(lambda e: tuned[e] if e in tuned else load_expert(e), E, None, mc, base_prior=prior,
                         expert_n_params=info["params_per_expert"])
    return Arm(name, {e: copy.deepcopy(load_expert(e)) for e in chosen}, make_lm,
               {"experts": [info["experts"][e] for e in chosen], "votes": votes.tolist(), "prior": prior.tolist()})


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
    sampler = WindowSampler(shards, min(cfg.seq_len or L, L), cfg.batch_size, seed=seed)
    trainers = [Trainer(m, tcfg, sampler) for m in models.values()]
    curve = []

    def check(step):
        lm = arm.make_lm(models)
        if curve_docs is not None:
            q = quality(lm, curve_docs, n_boot=n_boot)
            curve.append({"model": arm.name, "lr": lr, "step": step, "val_ppl": q["ppl_token"], "val_bpb": q["bpb"]})
        return slice_bpb(lm, val_docs)

    snap = lambda: {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in models.items()}  # noqa: E731
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


def best_of_grid(arm: Arm, shards, val_docs, cfg: FinetuneConfig, seed: int, curve_docs=None, n_boot: int = 200):
    """finetune() at every lr of the grid; the run of lowest validation-slice bpb (ties: the
    smaller lr) and its held-out curve."""
    best = None
    for lr in sorted(cfg.lrs):
        models, rec, curve = finetune(arm, shards, val_docs, cfg, lr, seed, curve_docs, n_boot)
        if best is None or rec["slice_bpb"] < best[1]["slice_bpb"]:
            best = (models, rec, curve)
    return best


def save_experts(gm, tuned: dict, tag: str, meta: dict) -> list[str]:
    """Put fine-tuned experts into the gm's store as new experts <expert>.ft-<tag> (weights
    only); refuses a name that is a pre-trained expert's."""
    _, _, info = gm
    names = []
    for e, m in tuned.items():
        name = f"{info['experts'][e]}.ft-{tag}"
        if name in info["experts"]:
            raise ValueError(f"{name}: would overwrite a pre-trained expert")
        info["store"].put(name, state_tensors(m), {"base": info["experts"][e], **meta}, keep_optimizer=False,
                          durable=True)
        names.append(name)
    info["store"].flush()
    return names


def learning_curve(dense, gm, pool, heldout, tokenizer, cfg: FinetuneConfig, sizes_kb, seeds, curve_kb=None,
                   n_boot: int = 1000, save: str = "largest", log=print):
    """Every (model, subset, seed) point: fine-tune, evaluate on the held-out reviews.
    dense: a GPT or None; gm: load_gm's (router, load_expert, info) or None.
    Returns (points, curve, {model: fine-tuned LM on the largest subset of the first seed}).
    Rows with subset_kb 0 are the models before fine-tuning (gm with the smallest subset's prior)."""
    pool_docs, held_docs = encode(pool, tokenizer), encode(heldout, tokenizer)
    points, curves, final = [], [], {}
    largest = sizes_kb[-1]
    for seed in seeds:
        subsets = nested_subsets(pool, sizes_kb, seed, cfg.val_every)
        for s in sizes_kb:
            tr_idx, val_idx = subsets[s]
            train_docs, val_docs = [pool_docs[i] for i in tr_idx], [pool_docs[i] for i in val_idx]
            arms = ([dense_arm(dense)] if dense is not None else []) + \
                   ([gm_arm(gm, train_docs, cfg.top_k, cfg.eval_k)] if gm is not None else [])
            nbytes = sum(pool_docs[i].nbytes for i in np.concatenate([tr_idx, val_idx]))
            kb = round(nbytes / KB) if s == "all" else s
            with tempfile.TemporaryDirectory(prefix="gm-ft-") as tmp:
                for arm in arms:
                    if s == sizes_kb[0] and (seed == seeds[0] or arm.name != "dense"):
                        q = quality(arm.make_lm(arm.models), held_docs, n_boot=n_boot)
                        before = [{"model": arm.name, "subset_kb": 0, "seed": sd, "steps": 0, "val_ppl": q["ppl_token"],
                                   "val_bpb": q["bpb"], "val_ppl_word": q["ppl_word"], "val_bpb_lo": q["bpb_lo"],
                                   "val_bpb_hi": q["bpb_hi"], "experts": ",".join(arm.info.get("experts", []))}
                                  for sd in (seeds if arm.name == "dense" else [seed])]
                        points += before
                    t0 = time.time()
                    shards = token_shards(train_docs, next(iter(arm.models.values())).cfg.vocab_size, Path(tmp) / arm.name)
                    on_curve = s == (curve_kb or largest) and seed == seeds[0]
                    models, rec, curve = best_of_grid(arm, shards, val_docs, cfg, seed, held_docs if on_curve else None)
                    lm = arm.make_lm(models)
                    q = quality(lm, held_docs, n_boot=n_boot)
                    row = {"model": arm.name, "subset_kb": kb, "seed": seed, "steps": rec["steps"],
                           "val_ppl": q["ppl_token"], "val_bpb": q["bpb"], "val_ppl_word": q["ppl_word"],
                           "val_bpb_lo": q["bpb_lo"], "val_bpb_hi": q["bpb_hi"], "actual_kb": nbytes / KB,
                           "n_reviews": len(tr_idx) + len(val_idx), "experts": ",".join(arm.info.get("experts", [])),
                           **rec, "seconds": round(time.time() - t0, 2)}
                    if arm.name != "dense" and (save == "all" or (save == "largest" and s == largest)):
                        tag = f"reviews-{'all' if s == 'all' else f'{s:g}kb'}-s{seed}"
                        row["saved_as"] = ",".join(save_experts(gm, models, tag, {k: row[k] for k in (
                            "subset_kb", "seed", "steps", "lr", "val_ppl", "val_bpb")}))
                    points.append(row)
                    curves += [{**c, "subset_kb": kb, "seed": seed} for c in curve if c["lr"] == rec["lr"]]
                    if s == largest and seed == seeds[0]:
                        final[arm.name] = lm
                    log(f"{arm.name:>5} {kb:>6g} KB seed {seed}: lr {rec['lr']:.0e} step {rec['steps']:>4}  "
                        f"held-out ppl {q['ppl_token']:.2f} bpb {q['bpb']:.4f}  ({row['seconds']:.1f} s)")
    return pd.DataFrame(points), pd.DataFrame(curves), final


# ---------------------------------------------------------------------------------------------
# the record


def summary(points: pd.DataFrame) -> pd.DataFrame:
    """Points averaged over seeds: mean and standard deviation (ddof 1; 0 for one seed)."""
    g = points.groupby(["model", "subset_kb"], sort=True)
    out = g.agg(n_seeds=("seed", "nunique"), steps=("steps", "mean"), val_ppl=("val_ppl", "mean"),
                val_ppl_std=("val_ppl", "std"), val_bpb=("val_bpb", "mean"), val_bpb_std=("val_bpb", "std"))
    return out.fillna(0.0).reset_index()


def figure(points: pd.DataFrame, curve: pd.DataFrame):
    """Held-out ppl and bpb against fine-tuning data (log x; before fine-tuning dashed), and the
    held-out ppl against fine-tuning steps for one subset size."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    tab = summary(points)
    for i, (model, g) in enumerate(tab.groupby("model")):
        color = f"C{i}"
        for ax, col, label in [(axes[0], "val_ppl", "held-out perplexity per token"),
                               (axes[1], "val_bpb", "held-out bits per byte")]:
            ft = g[g.subset_kb > 0]
            ax.errorbar(ft.subset_kb, ft[col], yerr=ft[f"{col}_std"], marker="o", capsize=3, color=color, label=model)
            if (g.subset_kb == 0).any():
                ax.axhline(g[g.subset_kb == 0][col].iloc[0], ls="--", color=color, alpha=0.6,
                           label=f"{model}, before fine-tuning")
            ax.set_xscale("log")
            ax.set_xlabel("fine-tuning data (KB of reviews, log scale)")
            ax.set_ylabel(label)
        if len(curve):
            c = curve[curve.model == model]
            axes[2].plot(c.step, c.val_ppl, "o-", color=color,
                         label=f"{model} ({c.subset_kb.iloc[0]:g} KB, lr {c.lr.iloc[0]:.0e})" if len(c) else model)
    axes[2].set_xlabel("fine-tuning step")
    axes[2].set_ylabel("held-out perplexity per token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Few-shot fine-tuning on Wildberries reviews (error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def generate_reviews(lms: dict, tokenizer, reviews: list[dict], ratings=(5, 4, 3, 2, 1), max_new_tokens: int = 60,
                     temperature: float = 0.8, top_p: float = 0.9, seed: int = 0) -> str:
    """Markdown: one review per star rating for every model, prompted with the rating and a
    product (the most frequent products of `reviews`, in turn)."""
    counts = pd.Series([r["product"] for r in reviews if r["product"]]).value_counts()
    products = list(counts.index[:len(ratings)]) or [""]
    prompts = {f"{r} из 5": review_prompt(r, products[i % len(products)]) for i, r in enumerate(ratings)}
    texts = generate_texts(lms, tokenizer, prompts, max_new_tokens, temperature, top_p, seed)
    lines = ["# Generated reviews", "",
             f"Sampling: max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}, seed={seed}", ""]
    for name, prompt in prompts.items():
        lines += [f"## {name}: «{prompt.strip().replace(chr(10), ' / ')}»", ""]
        lines += [f"- **{m}:** {' '.join(t.split())}" for m, t in texts[name].items()] + [""]
    return "\n".join(lines)
