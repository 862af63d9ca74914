"""Stage 01: raw sources -> cleaned, deduplicated, mixed and split JSONL (work/<data>/clean/).

  1. filter   per source, in worker processes: read, clean (clean.py), apply the document
              rules, compute exact keys and MinHash signatures (dedup.py). Writes
              clean/filtered/<source>.{jsonl,npz} and, last, <source>.json (stats + marker).
  2. dedup    across all sources at once: exact, then near duplicates -> clean/dedup.json.
  3. split    every kept document goes to train/val/test by the hash of its text (split.py);
              training documents are repeated or thinned by the source weight; the residual-junk
              scan (residual.py) runs over the kept documents here. Writes
              clean/{train,val,test}/<source>.jsonl and, last, clean/meta.json.
Each stage is skipped on a rerun when its marker holds the same parameter hash and its outputs
are intact (stages.py), so a killed run loses at most the source it was working on; a damaged
output is rebuilt, with what depends on it.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gmlib import atomic, checks, jsonl
from . import clean, dedup, residual, sources, split, stages
from .clean import CleanConfig
from .dedup import DedupConfig

EXAMPLES_PER_RULE = 3
EXAMPLE_CHARS = 300
DEDUP_RULES = ("exact_dup", "near_dup")


@dataclass
class DataConfig:
    data_name: str = "demo"
    sources: list = field(default_factory=lambda: list(sources.CORPUS))
    max_bytes_per_source: int | None = 100_000   # None: everything
    weights: dict = field(default_factory=dict)   # source -> weight in the training mix (default 1.0)
    val_frac: float = 0.01
    test_frac: float = 0.01
    workers: int = 2
    batch_bytes: int = 1_000_000                  # raw text per task sent to a worker
    on_missing: str = "error"                     # a missing source file: "error" or "skip" (counted)
    data_root: str | None = None                  # None: gmlib.paths.data_dir()
    base_url: str | None = None                   # download base if a file is not local (else $GM_DATA_URL)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # per-source cleaning switches and thresholds: source -> {CleanConfig field: value}, e.g.
    # {"social_anekdot_dialogues": {"skip_rules": ["newline_ratio"]}}
    source_rules: dict = field(default_factory=dict)
    # sources described in the params file alone: name -> {role, relpath, repo, origin, license}
    extra_sources: dict = field(default_factory=dict)

    def validate(self):
        """Every setting checked here, once, for the notebooks and the scripts alike: types,
        ranges, known and distinct sources, and the cleaning settings of every source."""
        checks.check_types(self, "DataConfig")
        checks.check_types(self.dedup, "DataConfig.dedup")
        for name, spec in self.extra_sources.items():
            sources.register(name, spec)
        unknown = [s for s in [*self.sources, *self.weights] if s not in sources.SOURCES]
        if unknown:
            raise ValueError(f"DataConfig: unknown source(s) {unknown}; known: {', '.join(sources.CORPUS)}")
        if dups := sorted({s for s in self.sources if self.sources.count(s) > 1}):
            raise ValueError(f"DataConfig.sources: {dups} listed more than once (a weight > 1 repeats a source)")
        if not self.sources:
            raise ValueError("DataConfig.sources: empty; name at least one source")
        bad = [s for s in self.source_rules if s not in self.sources]
        if bad:
            raise ValueError(f"source_rules: source(s) {bad} are not in sources")
        for s in self.source_rules:  # with_overrides raises on an unknown setting or rule
            check_clean(self.clean_for(s), f"DataConfig.source_rules.{s}")
        if self.on_missing not in ("error", "skip"):
            raise ValueError(f"DataConfig.on_missing must be 'error' or 'skip', not {self.on_missing!r}")
        split.split_of("", self.val_frac, self.test_frac)  # raises on bad fractions
        if bad := {s: w for s, w in self.weights.items() if not isinstance(w, (int, float)) or w < 0}:
            raise ValueError(f"DataConfig.weights: {bad}; a weight is a number >= 0")
        checks.at_least(self, "DataConfig", workers=1, batch_bytes=1)
        if self.max_bytes_per_source is not None:
            checks.at_least(self, "DataConfig", max_bytes_per_source=1)
        check_clean(self.clean, "DataConfig.clean")
        checks.fractions(self.dedup, "DataConfig.dedup", "threshold")
        return self

    def clean_for(self, name: str) -> CleanConfig:
        """The cleaning config of one source: `clean` with its `source_rules` applied."""
        role = sources.SOURCES[name].role
        return self.clean.for_role(role).with_overrides(self.source_rules.get(name, {}), f"source_rules.{name}")


def check_clean(c: CleanConfig, label: str):
    """Types and ranges of the cleaning thresholds, and roles that exist."""
    checks.check_types(c, label)
    checks.at_least(c, label, min_words=0, min_stop_words=0, min_mean_word_len=0.0)
    checks.fractions(c, label, "min_cyrillic", "max_foreign_cyrillic", "max_dup_line_frac", "min_line_punct",
                     "max_newline_ratio")
    if c.min_mean_word_len > c.max_mean_word_len:
        raise ValueError(f"{label}: min_mean_word_len={c.min_mean_word_len} > max_mean_word_len={c.max_mean_word_len}")
    if bad := [r for r in c.quality_roles if r not in sources.ROLES]:
        raise ValueError(f"{label}.quality_roles: unknown role(s) {bad}; known: {', '.join(sources.ROLES)}")


# --- 1. filter ------------------------------------------------------------------------------

_worker = {}


def _init_worker(dedup_cfg):
    _worker["hasher"] = dedup.MinHasher(dedup_cfg)


def _filter_batch(task):
    """In a worker: clean, rules and hashes for a batch of raw texts of one source."""
    role, cfg, batch = task
    t0 = time.process_time()
    hasher = _worker["hasher"]
    out = []
    for _, raw in batch:
        text, n_lines = clean.clean_text(raw, cfg)
        rule = clean.doc_filter(text, role, cfg)
        if rule is None:
            out.append((None, text, n_lines, dedup.exact_key(text), hasher.signature(text)))
        else:
            out.append((rule, text[:EXAMPLE_CHARS], n_lines, 0, None))
    return out, time.process_time() - t0


def cleaned_text(text: str, cfg: CleanConfig | None = None) -> str:
    """clean.clean_text's cleaned text alone (06 cleans the reviews with it)."""
    return clean.clean_text(text, cfg)[0]


def clean_record(rec: dict, cfg: CleanConfig | None = None) -> str | None:
    """The filter stage's rule for one corpus-format record ({"text", "source"}): its text cleaned
    (clean.clean_text), or None when a rule drops it (clean.doc_filter, with the rules of its source's
    role; "web" for a source not in the registry). 05_evaluate cleans an outside corpus with it."""
    role = sources.SOURCES[rec["source"]].role if rec.get("source") in sources.SOURCES else "web"
    text, _ = clean.clean_text(rec["text"], cfg)
    return text if clean.doc_filter(text, role, cfg) is None else None


def _limited(records, name, max_bytes):
    """(id, text) up to `max_bytes` UTF-8 bytes; the document crossing the limit is cut at a line."""
    used = 0
    for i, rec in enumerate(records):
        doc_id, text = rec.get("id") or f"{name}-{i}", rec["text"]
        if max_bytes is not None:
            b = text.encode("utf-8")
            if used + len(b) > max_bytes:
                cut = b[:max_bytes - used].decode("utf-8", errors="ignore")
                cut = cut[:cut.rfind("\n")] if "\n" in cut else cut
                if cut.strip():
                    yield doc_id, cut
                return
            used += len(b)
        yield doc_id, text


def _batches(items, batch_bytes):
    batch, size = [], 0
    for it in items:
        batch.append(it)
        size += len(it[1])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def filter_source(name: str, cfg: DataConfig, out_dir: Path, pool=None, log=print) -> dict:
    """Stage 1 for one source (skipped when its marker matches); returns its stats."""
    src = sources.SOURCES[name]
    ccfg = cfg.clean_for(name)
    phash = stages.params_hash("filter", name, src, cfg.max_bytes_per_source, ccfg, cfg.dedup)
    marker = out_dir / f"{name}.json"
    if (meta := stages.done(marker, phash, log)) is not None:
        return meta
    if pool is None:
        _init_worker(cfg.dedup)
    t0 = time.time()
    rs = sources.ReadStats()
    st = {"source": name, "role": src.role, "missing": 0, "docs_in": 0, "bytes_in": 0, "docs_kept": 0,
          "bytes_kept_raw": 0, "bytes_kept": 0, "lines_removed": 0, "cpu_seconds": 0.0,
          "removed": {r: 0 for r in clean.RULES}, "removed_bytes": {r: 0 for r in clean.RULES}, "examples": {}}
    try:
        path = sources.locate(name, root=cfg.data_root, base_url=cfg.base_url)
    except sources.SourceError as e:
        if cfg.on_missing == "error":
            raise
        st["missing"], st["missing_reason"], path = 1, str(e), None
    keys, sigs = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out_dir / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as fout:
        if path is not None:
            docs = _limited(sources.iter_records(path, stats=rs), name, cfg.max_bytes_per_source)
            tasks = ((src.role, ccfg, b) for b in _batches(docs, cfg.batch_bytes))
            for (_, _, batch), (results, cpu) in stages.ordered_map(pool, _filter_batch, tasks):
                st["cpu_seconds"] += cpu
                for (doc_id, raw), (rule, text, n_lines, key, sig) in zip(batch, results):
                    nraw = len(raw.encode("utf-8"))
                    st["docs_in"] += 1
                    st["bytes_in"] += nraw
                    st["lines_removed"] += n_lines
                    if rule is not None:
                        st["removed"][rule] += 1
                        st["removed_bytes"][rule] += nraw
                        ex = st["examples"].setdefault(rule, [])
                        if len(ex) < EXAMPLES_PER_RULE:
                            ex.append(text)
                        continue
                    fout.write(json.dumps({"id": doc_id, "source": name, "text": text}, ensure_ascii=False) + "\n")
                    st["docs_kept"] += 1
                    st["bytes_kept_raw"] += nraw
                    st["bytes_kept"] += len(text.encode("utf-8"))
                    keys.append(key)
                    sigs.append(sig)
    with atomic.atomic_path(out_dir / f"{name}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys, np.uint64),
                 sigs=np.stack(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), np.uint32))
    st["read"] = rs.as_dict()
    st["seconds"] = round(time.time() - t0, 2)
    for msg in rs.errors if rs.empty_file or rs.truncated else []:
        log(f"warning: {msg}")
    return stages.finish(marker, phash, st, outputs=[out_dir / f"{name}.jsonl", out_dir / f"{name}.npz"])


# --- 2. dedup -------------------------------------------------------------------------------

def dedup_all(cfg: DataConfig, filtered: dict, out_dir: Path, log=print) -> dict:
    """Stage 2: exact + near duplicates over the kept documents of all sources, in source order."""
    phash = stages.params_hash("dedup", cfg.dedup, [(filtered[s]["params_hash"], stages.output_hashes(filtered[s]))
                                                     for s in cfg.sources])
    marker = out_dir / "dedup.json"
    if (meta := stages.done(marker, phash, log)) is not None:
        return meta
    t0 = time.time()
    keys, sigs, owner = [], [], []
    for s in cfg.sources:
        path = out_dir / "filtered" / f"{s}.npz"
        try:
            with np.load(path) as z:
                keys.append(z["keys"])
                sigs.append(z["sigs"])
        except (OSError, ValueError, EOFError, KeyError) as e:
            raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it and rerun") from e
        owner += [(s, i) for i in range(len(keys[-1]))]
    keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    sigs = np.concatenate(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), np.uint32)
    reason, dup_of = dedup.find_duplicates(keys, sigs, cfg.dedup)
    removed = {s: {r: [] for r in DEDUP_RULES} for s in cfg.sources}
    dup_pairs = {r: [] for r in DEDUP_RULES}
    for g in np.flatnonzero(reason).tolist():
        r = DEDUP_RULES[reason[g] - 1]
        s, i = owner[g]
        removed[s][r].append(i)
        if len(dup_pairs[r]) < EXAMPLES_PER_RULE:
            dup_pairs[r].append({"removed": owner[g], "kept": owner[dup_of[g]]})
    meta = {"n_docs": len(keys), "removed": removed, "pairs": dup_pairs, "seconds": round(time.time() - t0, 2)}
    return stages.finish(marker, phash, meta)


# --- 3. split and mix -----------------------------------------------------------------------

def _read_jsonl(path):
    """Records of one of our own JSONL files; damage (bad UTF-8 or JSON, a blank line, a last line
    cut short) is an error naming the file and line."""
    try:
        for _, rec in jsonl.records(path, skip_blank=False, need_newline=True):
            yield rec
    except ValueError as e:  # jsonl.NotUTF8 is one too
        raise ValueError(f"{e}; delete it and rerun 01_data") from e


def split_all(cfg: DataConfig, filtered: dict, dd: dict, clean_dir: Path, log=print) -> dict:
    """Stage 3: write clean/{train,val,test}/<source>.jsonl; training docs weighted."""
    phash = stages.params_hash("split", residual.VERSION, dd["params_hash"], cfg.val_frac, cfg.test_frac,
                               {s: cfg.weights.get(s, 1.0) for s in cfg.sources})
    marker = clean_dir / "meta.json"
    if (meta := stages.done(marker, phash, log)) is not None:
        return meta
    marker.unlink(missing_ok=True)
    t0 = time.time()
    counts = {sp: {} for sp in split.SPLITS}
    counts["residual"], residual_examples = {}, {}
    dup_examples = {r: [] for r in DEDUP_RULES}
    for s in cfg.sources:
        drop = {i: r for r in DEDUP_RULES for i in dd["removed"][s][r]}
        w = cfg.weights.get(s, 1.0)
        c = {sp: {"docs": 0, "bytes": 0} for sp in split.SPLITS}
        c["dedup_bytes"] = {r: 0 for r in DEDUP_RULES}
        c["residual"] = {k: 0 for k in residual.KINDS}
        rex = residual_examples[s] = {}
        with atomic.atomic_path(clean_dir / "train" / f"{s}.jsonl") as ttr, \
                atomic.atomic_path(clean_dir / "val" / f"{s}.jsonl") as tva, \
                atomic.atomic_path(clean_dir / "test" / f"{s}.jsonl") as tte:
            files = {"train": open(ttr, "w", encoding="utf-8"), "val": open(tva, "w", encoding="utf-8"),
                     "test": open(tte, "w", encoding="utf-8")}
            try:
                for i, rec in enumerate(_read_jsonl(clean_dir / "filtered" / f"{s}.jsonl")):
                    nb = len(rec["text"].encode("utf-8"))
                    if i in drop:
                        c["dedup_bytes"][drop[i]] += nb
                        if len(dup_examples[drop[i]]) < EXAMPLES_PER_RULE:
                            dup_examples[drop[i]].append(rec["text"][:EXAMPLE_CHARS])
                        continue
                    for kind in residual.scan(rec["text"]):  # kept documents, before mixing
                        c["residual"][kind] += 1
                        if len(rex.setdefault(kind, [])) < EXAMPLES_PER_RULE:
                            rex[kind].append({"id": rec["id"], "line": residual.first_line(rec["text"], kind)})
                    sp = split.split_of(rec["text"], cfg.val_frac, cfg.test_frac)
                    n = split.copies(rec["text"], w) if sp == "train" else 1
                    line = json.dumps(rec, ensure_ascii=False) + "\n"
                    for _ in range(n):
                        files[sp].write(line)
                    c[sp]["docs"] += n
                    c[sp]["bytes"] += n * nb
            finally:
                for f in files.values():
                    f.close()
        for sp in split.SPLITS:
            counts[sp][s] = c[sp]
        counts.setdefault("dedup_bytes", {})[s] = c["dedup_bytes"]
        counts["residual"][s] = c["residual"]
    meta = {"sources": list(cfg.sources), "weights": {s: cfg.weights.get(s, 1.0) for s in cfg.sources},
            "val_frac": cfg.val_frac, "test_frac": cfg.test_frac, "counts": counts, "dedup_examples": dup_examples,
            "residual_examples": residual_examples,
            "seconds": round(time.time() - t0, 2)}
    return stages.finish(marker, phash, meta, outputs=[clean_dir / sp / f"{s}.jsonl" for sp in split.SPLITS
                                                       for s in cfg.sources])


# --- all of stage 01 ------------------------------------------------------------------------

def prepare(cfg: DataConfig, clean_dir: Path, log=print) -> dict:
    """Run (or reuse) filter -> dedup -> split into `clean_dir`; return the three stages' records."""
    cfg.validate()
    clean_dir = Path(clean_dir)
    if stale := atomic.remove_stale(clean_dir):
        log(f"removed {len(stale)} temporary file(s) left by a killed run, e.g. {stale[0]}")
    t0 = time.time()
    filtered = {}
    with stages.worker_pool(cfg.workers, _init_worker, (cfg.dedup,)) as pool:
        for s in cfg.sources:
            filtered[s] = filter_source(s, cfg, clean_dir / "filtered", pool, log)
            f = filtered[s]
            log(f"filter {s:38s} {f['docs_in']:7d} docs {f['bytes_in'] / 1e6:8.2f} MB -> {f['docs_kept']:7d} docs "
                f"{f['bytes_kept'] / 1e6:8.2f} MB  ({f['seconds']:.0f} s)")
    t1 = time.time()
    dd = dedup_all(cfg, filtered, clean_dir, log)
    log(f"dedup: {sum(len(v) for r in dd['removed'].values() for v in r.values())} of {dd['n_docs']} documents removed")
    t2 = time.time()
    meta = split_all(cfg, filtered, dd, clean_dir, log)
    log("split: " + ", ".join(f"{sp} {sum(c['docs'] for c in meta['counts'][sp].values())} docs"
                              for sp in split.SPLITS))
    return {"filtered": filtered, "dedup": dd, "split": meta,
            "wall_seconds": {"filter": round(t1 - t0, 2), "dedup": round(t2 - t1, 2),
                             "split": round(time.time() - t2, 2)}}


def iter_split(clean_dir, split_name: str, sources_=None):
    """Documents {"id", "source", "text"} of one split, source by source."""
    clean_dir = Path(clean_dir)
    meta = json.loads((clean_dir / "meta.json").read_text())
    for s in sources_ or meta["sources"]:
        yield from _read_jsonl(clean_dir / split_name / f"{s}.jsonl")
