"""The results report (results/REPORT.md): the experiment's tables and the frontier's headline, built from the
records the notebooks wrote, with the committed findings of each run folder between them.

Nothing here measures anything. Every number is read from results/<run>/ (05's eval_quality.csv,
eval_parus.csv and summary.json, 06's finetune_table.csv, each stage's device and seconds in
metrics.json) and from the benchmarks' JSON in results/bench/. The article's figures sit beside
ours as a reference only: its perplexities are on its own test set with its own tokenizer.
"""
import json
import re
from pathlib import Path

import pandas as pd

from gmlib import atomic, frontier
from .runlog import markdown_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"  # the README's headline block

# the article's Table 2 (held-out perplexity, its own test set) and Table 3 (PARus accuracy)
ARTICLE_PPL = {"ruGPT3-small": 30.91, "ruGPT3-medium": 22.96, "ruGPT3-large": 21.34, "GM30B": 18.02}
ARTICLE_PARUS = {"ruGPT3-small": 0.562, "ruGPT3-medium": 0.598, "ruGPT3-large": 0.584, "ruGPT3-XL": 0.676,
                 "GM30B": 0.704, "YaLM-1B": 0.766}


def kind(name: str, router) -> str:
    if name.endswith("-oracle"):
        return "gm oracle (upper bound)"
    if name.endswith("-seed"):
        return "gm seed alone"
    if router:
        return "gm expert alone" if "-expert" in name else "gm mixture"
    return "dense ensemble" if "+" in name else "dense"


def _m(n) -> str:
    return f"{n / 1e6:.3g}M"


def _ci(v, lo, hi, fmt="{:.4f}"):
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def heldout_table(quality: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """One row per model: what it is, its size and training device-seconds, macro bpb (the
    headline) and its difference from the reference's (the first model), micro bpb and per-word
    perplexity with their 95% intervals, and micro bpb minus the reference's; paired intervals.
    Records of 05 from before the macro bpb (results/experiment/) have micro bpb only."""
    ref, macro = quality["model"].iloc[0], "bpb_macro" in quality.columns
    rows = []
    for r in quality.itertuples():
        router = summary["models"].get(r.model, {}).get("router")
        row = {"model": r.model, "kind": kind(r.model, router), "router": router or "",
               "params_total_M": round(r.params_total / 1e6, 1), "params_active_M": round(r.params_active / 1e6, 1),
               "train_gpu_s": None if pd.isna(r.train_gpu_seconds) else round(r.train_gpu_seconds, 1)}
        if macro:
            row["bpb_macro [95% CI]"] = _ci(r.bpb_macro, r.bpb_macro_lo, r.bpb_macro_hi)
            row[f"bpb_macro - {ref} [95% CI]"] = "" if r.model == ref else _ci(
                r.bpb_macro_delta, r.bpb_macro_delta_lo, r.bpb_macro_delta_hi, "{:+.4f}")
        row.update({"bpb [95% CI]": _ci(r.bpb, r.bpb_lo, r.bpb_hi),
                    "ppl_word [95% CI]": _ci(r.ppl_word, r.ppl_word_lo, r.ppl_word_hi, "{:.1f}"),
                    f"bpb - {ref} [95% CI]": "" if r.model == ref else
                    _ci(r.bpb_delta, r.bpb_delta_lo, r.bpb_delta_hi, "{:+.4f}")})
        rows.append(row)
    return pd.DataFrame(rows)


def _unpaired(r, d) -> str:
    """r against another model d by their own 95% intervals (05 pairs only with the reference)."""
    if r.bpb_lo > d.bpb_hi:
        word = "worse, the 95% intervals apart"
    elif r.bpb_hi < d.bpb_lo:
        word = "better, the 95% intervals apart"
    else:
        word = "the 95% intervals overlap"
    return (f" Against {d.model} ({_m(d.params_total)}, {d.train_gpu_seconds:.0f} device-s): {word}, bpb "
            f"{_ci(r.bpb, r.bpb_lo, r.bpb_hi)} against {_ci(d.bpb, d.bpb_lo, d.bpb_hi)}.")


def verdict(quality: pd.DataFrame, summary: dict) -> list[str]:
    """For every gm mixture, in words: better, worse or not distinguishable from the reference
    model (the first), by the paired bootstrap interval of the bpb difference; then against every
    other dense model, by the two models' own intervals."""
    ref = quality.iloc[0]
    kinds = [kind(m, summary["models"].get(m, {}).get("router")) for m in quality["model"]]
    others = [d for d, k in zip(quality.iloc[1:].itertuples(), kinds[1:]) if k == "dense"]
    lines = []
    for r, k in zip(quality.itertuples(), kinds):
        if k != "gm mixture":
            continue
        if r.bpb_delta_hi < 0:
            word = "better than"
        elif r.bpb_delta_lo > 0:
            word = "worse than"
        else:
            word = "not distinguishable from"
        lines.append(f"{r.model} ({_m(r.params_total)} stored, {_m(r.params_active)} active, "
                     f"{r.train_gpu_seconds:.0f} device-s) is {word} {ref.model} ({_m(ref.params_total)}, "
                     f"{ref.train_gpu_seconds:.0f} device-s): bpb {r.bpb:.4f} against {ref.bpb:.4f}, difference "
                     f"{_ci(r.bpb_delta, r.bpb_delta_lo, r.bpb_delta_hi, '{:+.4f}')}"
                     + (f"; macro bpb {r.bpb_macro:.4f} against {ref.bpb_macro:.4f}, difference "
                        f"{_ci(r.bpb_macro_delta, r.bpb_macro_delta_lo, r.bpb_macro_delta_hi, '{:+.4f}')}"
                        if hasattr(r, "bpb_macro") else "") + "."
                     + "".join(_unpaired(r, d) for d in others))
    return lines


def parus_table(parus: pd.DataFrame) -> pd.DataFrame:
    """Accuracy [95% Wilson interval] of every model (rows) in every prompt style (columns)."""
    parus = parus.assign(cell=[_ci(a, lo, hi, "{:.2f}") for a, lo, hi in zip(parus.acc, parus.ci_lo, parus.ci_hi)])
    table = parus.pivot(index="model", columns="style", values="cell").reset_index()
    table.columns.name = None
    order = {m: i for i, m in enumerate(dict.fromkeys(parus["model"]))}
    return table.sort_values("model", key=lambda s: s.map(order)).reset_index(drop=True)


def article_table(values: dict, column: str) -> pd.DataFrame:
    return pd.DataFrame({"model (the article)": list(values), column: list(values.values())})


def cost_table(metrics_files: list) -> pd.DataFrame:
    """Every stage of the given runs: its device and minutes (each stage had its device to itself)."""
    rows = []
    for f in metrics_files:
        stages = json.loads(Path(f).read_text()).get("stages", {})
        rows += [{"run": Path(f).parent.name, "stage": s, "device": v["device"], "minutes": round(v["seconds"] / 60, 2)}
                 for s, v in stages.items()]
    return pd.DataFrame(rows, columns=["run", "stage", "device", "minutes"])


def speed_table(records: list, variants: list) -> pd.DataFrame:
    """The training-speed records of the chosen variants (in that order) that measured a GPU: one row
    per variant and device, so that a variant measured on two kinds of card shows both."""
    ok = sorted((r for r in records if r.get("status") == "ok" and r.get("mfu") is not None), key=lambda r: r["device"])
    return pd.DataFrame([{"variant": v, "params_M": round(r["params"] / 1e6, 1), "batch": r["batch"],
                          "tokens_per_s": round(r["tokens_per_s"]), "mfu": r["mfu"],
                          "peak_mem_gb": r["peak_mem_gb"], "device": r["device"], "date": r["date"][:10]}
                         for v in variants for r in ok if r["variant"] == v])


def store_lines(offload: dict | None, scale: dict | None) -> list[str]:
    """The README's lines on swapping and scale, from bench/offload.py's and bench/scale.py's records.
    An offload record without source "gm_trainer" came from the benchmark's own swap loop (before
    issue 19) and says so."""
    lines = []
    if offload and offload.get("source") == "gm_trainer":
        vs = offload.get("overhead_vs_resident")
        copies = f", copies at {offload['copy_gb_s']:.1f} GB/s" if offload.get("copy_gb_s") else ""
        # the wait clock counts the per-segment writeback and the final flush, which a resident run pays too
        parts = ""
        if all(k in offload for k in ("fetch_s", "load_s", "writeback_s", "sync_s", "wall_s")):
            w = offload["wall_s"]
            parts = (f": fetch and load {(offload['fetch_s'] + offload['load_s']) / w:.2%}, writeback and flush "
                     f"{(offload['writeback_s'] + offload['sync_s']) / w:.2%}")
            if "resident_wait_s" in offload:
                parts += f"; the all-resident run waited {offload['resident_wait_s']:.2f} s"
        lines.append(f"The gm trainer swapping {offload['experts']} experts of {offload['expert_params'] / 1e6:.0f}M "
                     f"through a GPU tier of {offload['gpu_slots']}: its wait clock read "
                     f"{offload['overhead_frac']:.2%}"
                     f" of the wall time (from each expert's second segment on{parts}; the whole run "
                     f"{offload['overhead_frac_whole']:.2%}){copies}, and its time per step was "
                     + (f"{vs:+.1%} against the same trainer with every expert resident" if vs is not None else
                        "without a resident run to compare") + f" ({offload.get('device', '')}).")
    elif offload:
        lines.append(f"Swapping {offload['experts']} experts of {offload['expert_params'] / 1e6:.0f}M "
                     f"through a GPU tier of {offload['gpu_slots']}: the GPU waited {offload['overhead_frac']:.2%} "
                     f"of the wall time, copies ran at "
                     f"{offload['copy_gb_s']:.1f} GB/s, and the run was {offload['overhead_vs_baseline']:.1%} slower "
                     f"than the same schedule without swapping ({offload.get('device', '')}; the benchmark's own swap "
                     f"loop, not the gm trainer's).")
    if scale:
        lines.append(f"Parameters trained on one GPU: {scale['total_params'] / 1e9:.2f}B "
                     f"({scale['experts']} experts of "
                     f"{scale['expert_params'] / 1e6:.0f}M), {scale['seconds_per_expert']:.2f} s an expert, peak "
                     f"{scale['peak_gpu_gb'] or 0:.1f} GB GPU, {scale['peak_ram_gb']:.1f} GB RAM, "
                     f"{scale['disk_gb']:.1f} GB disk "
                     f"({scale.get('device', '')}).")
    return lines


def section(title: str, body) -> str:
    if isinstance(body, pd.DataFrame):
        body = markdown_table(body, ".4g")
    elif isinstance(body, (list, tuple)):
        body = "\n".join(f"- {line}" for line in body) + "\n"
    return f"#### {title}\n\n{body}\n"


def frontier_table(ledger: pd.DataFrame) -> pd.DataFrame:
    """The frontier's headline (gmlib.frontier.best_table of the ledger 05 appends to): per budget the best
    dense model, the best gm mixture with its active parameters, and their paired macro and micro differences."""
    best = frontier.best_table(ledger)
    if best.empty:
        raise ValueError("the frontier ledger has no budget with both a dense model and a gm mixture")
    return pd.DataFrame({
        "budget": best["budget"], "6ND FLOPs": best["budget_flops_6nd"].map("{:.3g}".format),
        "best dense": best["best_dense"], "dense macro bpb": best["dense_bpb_macro"].map("{:.4f}".format),
        "best gm": best["best_gm"], "gm macro bpb": best["gm_bpb_macro"].map("{:.4f}".format),
        "gm active params": best["gm_params_active"].map(_m),
        "gm - dense, macro [95% CI]": [f"{d:+.4f} {ci} ({r:+.2%})" for d, ci, r in
                                       zip(best["delta_macro"], best["delta_macro_ci"], best["delta_macro_rel"])],
        "micro [95% CI]": [f"{d:+.4f} {ci}" for d, ci in zip(best["delta_micro"], best["delta_micro_ci"])]})


def replace_block(path, block: str):
    """Put `block` between the BEGIN and END markers of the file at `path` (atomically): the README's
    headline table, written by 07 from the frontier's ledger."""
    path = Path(path)
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{path}: expected one '{BEGIN}' ... '{END}' block to replace")
    atomic.write_text(path, pattern.sub(lambda _: f"{BEGIN}\n{block.strip()}\n{END}", text))


def findings(paths, root) -> list[str]:
    """The committed findings (Markdown, paths from the repository `root`) the report strings in, each with
    where it comes from; a missing one is an error naming it, not a silently shorter report."""
    out = []
    for rel in paths:
        f = Path(root) / rel
        if not f.is_file():
            raise FileNotFoundError(f"{f}: a findings file the report includes is missing (the `findings` parameter)")
        out.append(f"{f.read_text().strip()}\n\n<sub>from `{rel}`</sub>\n")
    return out


def full_report(run_name: str, experiment_md: str, frontier_md: str | None, ledger_rel: str | None,
                findings_md: list[str], frontier_figure: str = "frontier/frontier.png") -> str:
    """results/REPORT.md: the frontier's headline (from the ledger `ledger_rel`, under results/; its figure at
    `frontier_figure`, relative to the report), the findings, the experiment's report."""
    parts = ["# gm: results\n",
             "Written by `notebooks/07_report.ipynb` from the records under `results/`: every table below is read from "
             "a run's files, and the prose between them is each run folder's committed findings. How each run was made "
             "is in its folder (`NOTE.md`, `*.params.yaml`, the executed notebooks); GPU measurements with their "
             "predictions are in `bench/NOTES.md`.\n"]
    if frontier_md is not None:
        parts += [f"## The compute frontier (`results/{ledger_rel}`)\n",
                  "Per budget of training compute (6·N·tokens), the best dense model and the best gm mixture by macro "
                  "bpb on the same test documents, with the paired difference (below zero: gm better).\n",
                  frontier_md, f"![the frontier]({frontier_figure})\n"]
    parts += findings_md
    parts += [f"### Written by 07 from `results/{run_name}/`\n", experiment_md]
    return "\n".join(parts)


def generations(record: dict, models: list) -> str:
    """The continuations of `models` for each prompt, from 05's eval_generations.json."""
    params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    lines = [f"Sampling: {params}.", ""]
    for pname, by_model in record["texts"].items():
        lines += [f"**{pname}.** Context: {record['prompts'][pname]}", ""]
        lines += [f"- **{m}:** …{' '.join(by_model[m].split())}" for m in models if m in by_model]
        lines.append("")
    return "\n".join(lines)


def read_json(path) -> dict | list | None:
    """A record file's JSON, or None when the record was never written (a benchmark not run)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def finetune_table(path) -> pd.DataFrame | None:
    """06's finetune_table.csv, the columns the report shows; None when fine-tuning did not run."""
    path = Path(path)
    if not path.is_file():
        return None
    return pd.read_csv(path)[["model", "subset_kb", "n_seeds", "val_ppl", "val_ppl_std", "val_bpb"]]


def gpu_minutes(cost: pd.DataFrame) -> float:
    """Minutes of the cost table's stages that ran on a GPU."""
    return cost.loc[~cost.device.str.startswith("cpu"), "minutes"].sum()


def shown_models(heldout: pd.DataFrame, gen_models: list | None) -> list:
    """The models whose generations the report shows: gen_models, or all but the experts alone and the oracles."""
    if gen_models is not None:
        return gen_models
    return [m for m, k in zip(heldout["model"], heldout["kind"])
            if k not in ("gm expert alone", "gm oracle (upper bound)")]


def bpb_figure(quality: pd.DataFrame, kinds, run_name: str):
    """Micro bpb with its 95% interval against stored parameters (log scale), one series per kind of model."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for k, grp in quality.assign(kind=kinds).groupby("kind", sort=False):
        ax.errorbar(grp.params_total / 1e6, grp.bpb, yerr=[grp.bpb - grp.bpb_lo, grp.bpb_hi - grp.bpb], fmt="o",
                    capsize=3, label=k)
        for r in grp.itertuples():
            ax.annotate(r.model, (r.params_total / 1e6, r.bpb), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="stored parameters (millions, log scale)", ylabel="bits per byte on the test split (95% CI)",
           title=f"{run_name}: held-out quality against model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def document(heldout, verdict_lines, parus_wide, finetune, gen, shown, cost, speed, store, prefix: str = "") -> str:
    """The report's Markdown (report.md, and the full report's experiment part): every section in order;
    figure links start with `prefix` (the run folder, relative to where the text goes)."""
    parts = [
        section("Held-out quality (test split)", heldout),
        section("Does gm beat dense at equal compute?", verdict_lines or ["no gm mixture in this run"]),
        f"![bits per byte against parameters]({prefix}report_bpb.png)\n",
        section("The article's Table 2 (its own test set; perplexity, not comparable)",
                article_table(ARTICLE_PPL, "perplexity")),
        section("PARus zero-shot (accuracy [95% CI])", parus_wide),
        section("The article's Table 3 (PARus)", article_table(ARTICLE_PARUS, "accuracy")),
    ]
    if finetune is not None:
        parts += [section("Fine-tuning on shop reviews (held-out perplexity)", finetune),
                  f"![fine-tuning curve]({prefix}finetune.png)\n"]
    if gen:
        parts += [section("Generation (the article's two prompts)", generations(gen, shown)),
                  f"Every model's continuations: [{prefix}eval_generations.md]({prefix}eval_generations.md)\n"]
    parts += [section(f"Cost ({gpu_minutes(cost):.1f} GPU-minutes in all)", cost),
              section("Training speed (results/bench/train_speed.json)", speed),
              section("Expert store", store or ["no store benchmark recorded"])]
    return "\n".join(parts)
