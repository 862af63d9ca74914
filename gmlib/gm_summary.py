"""gm.json: what the ranks of a gm recorded, merged into one summary in the dense trainer's terms.

Each finished expert has its record (out_dir/experts/<name>.json: its trainer state, accounting and
validation losses), each rank its own (out_dir/ranks/rank_XXX.json: its store's swaps and its
clock); summarize reads them after the last barrier, on rank 0.
"""
import json
from dataclasses import asdict
from pathlib import Path

from .clock import PARTS

FORMAT = "gm-v1"


def expert_name(e: int) -> str:
    return f"expert_{e:03d}"


ADDITIVE = ("tokens", "gpu_seconds", "eval_seconds", "flops_6nd", "flops")


def summarize(cfg, mcfg, out: Path, world_size, plan: dict, seed_meta: dict | None, final: int) -> dict:
    """gm.json: config, experts with their shares, steps and val losses, and compute summed over
    experts (and the seed run) in the dense trainer's terms, plus the store's swap accounting and, from
    each rank's clock (gmlib.clock), the time its GPU waited for experts (trainer_wait_s, _frac, _parts).
    An expert's `steps` counts from the start of its trajectory (the seed's steps included);
    `own_steps` are the ones it trained itself. `final`: the last routing round (its router and
    documents are the gm's)."""
    shares, max_steps, branch = plan["shares"], plan["max_steps"], plan["branch_step"]
    seed_acct = seed_meta["accounting"] if seed_meta else None
    routed = json.loads((out / "routed" / f"round_{final:03d}" / "done.json").read_text())
    records = []
    for e in range(cfg.n_experts):
        m = json.loads((out / "experts" / f"{expert_name(e)}.json").read_text())
        records.append({"name": expert_name(e), "expert": e, "rank": m["rank"], "pid": m["pid"],
                        "share": float(shares[e]), "budget_tokens": int(plan["budget_tokens"][e]),
                        "max_steps": max_steps[e], "steps": m["trainer"]["step"],
                        "branch_step": branch, "own_steps": m["trainer"]["step"] - branch,
                        "docs_final": routed["docs"][e], "val_loss_start": m.get("val_loss_start"),
                        "val_loss": m.get("val_loss"), "accounting": m["accounting"],
                        "history": m["trainer"]["history"]})
    accts = [r["accounting"] for r in records] + ([seed_acct] if seed_acct else [])
    acct = {k: sum(a[k] for a in accts) for k in ADDITIVE}
    acct.update(step=acct["tokens"] // (cfg.train.batch_size * cfg.train.grad_accum * mcfg.seq_len),  # seed's included
                params=cfg.n_experts * mcfg.n_params, params_per_expert=mcfg.n_params, params_active=mcfg.n_params,
                flops_per_token=mcfg.flops_per_token(),
                tokens_per_s=acct["tokens"] / acct["gpu_seconds"] if acct["gpu_seconds"] else 0.0,
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
            "schedule": cfg.train.schedule, "seed_fraction": branch / plan["total_steps"],
            "train_top_r": cfg.train_top_r,
            "total_steps": plan["total_steps"], "branch_step": branch, "seed": seed,
            "router_path": f"router/round_{final:03d}", "n_experts": cfg.n_experts,
            "experts": [r["name"] for r in records], "world_size": world_size, "shares": [float(s) for s in shares],
            "val_loss": [r["val_loss"] for r in records], "records": records, "accounting": acct,
            "swap": swap, "ranks": ranks}
