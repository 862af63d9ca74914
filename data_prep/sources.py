"""The corpus sources: where each came from, under what license, what role it plays, and a
loader that reads it from the shared data folder or downloads it.

The registry mirrors ../shared/data/SOURCES.md (public GitHub snapshots). A source is a
gzip-compressed JSON Lines file, one document per line with at least `text`. The loader
looks in `<data_dir>/<relpath>`; when that is missing and a base URL is configured
(argument, or $GM_DATA_URL), it downloads `<base_url>/<relpath>` into a cache folder
atomically, so an interrupted download never leaves a file that looks complete.

Bad input is never a crash that loses finished output: an undecodable byte is replaced
(U+FFFD, later removed by cleaning) and counted, and so is a lone UTF-16 surrogate escaped in
the JSON ("\\ud800": valid JSON, but not encodable as UTF-8); a line that is not JSON or has no
string `text` is skipped and counted; a truncated gzip, or one whose CRC or length check fails
at its end, keeps what was read and is counted; a file with no records at all (zero bytes, a
gzip of nothing) is counted and warned about; a UTF-8 byte-order mark is dropped. These counts
(`ReadStats`, every message with file and line) go into the audit. A missing file or one that
is not gzip at all is a clear error naming the file.
"""
import gzip
import json
import os
import re
import shutil
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field, asdict
from pathlib import Path

from gmlib import atomic, jsonl
from gmlib.paths import data_dir

ROLES = ("web", "news", "wiki", "books", "social", "reviews")


@dataclass(frozen=True)
class Source:
    name: str
    role: str        # one of ROLES (eval for PARus)
    relpath: str     # path under the data folder (and under a download base URL)
    repo: str        # public origin (GitHub owner/name; several separated by ", ")
    origin: str      # path(s) inside that repository
    license: str
    kind: str = "corpus"  # corpus (pre-training text), reviews (fine-tuning), eval (PARus)


def _c(name, role, repo, origin, license):
    return Source(name, role, f"corpus/{name}/{name}.jsonl.gz", repo, origin, license)


_REGISTRY = [
    _c("blogs_habr", "web", "romovpa/habrahabr-dataset",
       "tmblogs-dataset/tmblogs/habrahabr_posts.json", "none stated (Habrahabr user posts)"),
    _c("books_progit2_ru", "books", "progit/progit2-ru",
       "book/*/sections/*.asc, ch*.asc, A-*.asc, B-*.asc, C-*.asc", "CC BY-NC-SA 3.0"),
    _c("books_rsd", "books", "nevmenandr/RSD",
       "author/*/corpus/*.txt, genre/corpus/*.txt", "GPL-3.0 repo; texts public domain"),
    _c("books_rusdracor", "books", "dracor-org/rusdracor", "tei/*.xml", "CC0 1.0"),
    _c("books_ruslit", "books", "d0rj/RusLit",
       "prose/*/*.txt, poems/*/*.txt, publicism/*/*.txt", "public domain (README)"),
    _c("books_russiannovels", "books", "JoannaBy/RussianNovels",
       "corpus/*.txt", "none stated; authors died before 1946"),
    _c("news_ng", "news", "mannefedov/ru_kw_eval_datasets",
       "data/ng_{0,1}.jsonlines.zip", "none stated (scraped; research use)"),
    _c("news_rt", "news", "mannefedov/ru_kw_eval_datasets",
       "data/russia_today_{0..7}.jsonlines.zip", "none stated (scraped; research use)"),
    _c("reviews_kinopoisk_films", "reviews",
       "N0tilT/Scrapping, VikentiiEfimov/Lab01_Python_B_PIN_AI_2416_Efimov-Vikentiy, itsecd/ptm-4, Andmr1/lab_2, "
       "AlexeyTretyakov2002/mag_python, moter1026/review_Kinopoisk_lab5",
       "dataset/{good,bad}/NNNN.txt", "none stated (Kinopoisk user content)"),
    _c("reviews_livelib_books", "reviews",
       "grablerr/APlabs, Drowchik/labs_python, mestromezer/application_programming_first_lab_and_dataset, "
       "TTYEEW/Python",
       "dataset/{1,2,3,4,5,other}/NNNN.txt", "none stated (LiveLib user content)"),
    _c("reviews_otzovik_banks", "reviews", "kingtuler1454/Work_with_otzovik",
       "dataset/{1,2,3,4,5}/NNNN.txt", "none stated (Otzovik user content)"),
    _c("reviews_sentirueval2015_restaurants", "reviews", "kovalon/NeuroNetwork",
       "SentiRuEval_rest_markup_{train,test}.xml", "none stated (shared-task data)"),
    _c("science_cyberleninka", "web", "mannefedov/ru_kw_eval_datasets",
       "data/cyberleninka_4.jsonlines.zip", "none stated (scraped; research use)"),
    _c("social_anekdot_dialogues", "social", "Koziev/NLP_Datasets",
       "Conversations/Data/extract_dialogues_from_anekdots.tar.xz", "CC0 1.0"),
    _c("social_forum_sensitive_topics", "social", "s-nlp/inappropriate-sensitive-topics",
       "Version{1,2}/*/*.csv", "CC BY-NC-SA 4.0"),
    _c("social_ruarg_comments", "social", "dialogue-evaluation/RuArg",
       "data/{train,val_empty,test-no_labels}.tsv", "none stated (user comments)"),
    _c("social_rusentitweet", "social", "sismetanin/rusentitweet", "rusentitweet_full.csv", "none stated (tweets)"),
    _c("social_sentirueval2016", "social", "mokoron/sentirueval",
       "banks_test_etalon.xml, tkk_test_etalon.xml", "none stated (tweets)"),
    _c("social_telegram_news", "social", "NKTKLN/telegram-news-classifier",
       "data/raw/*_messages.json", "CC BY 4.0 (data)"),
    _c("wiki_articles_xlplagiarism", "wiki", "wan3s/xlplagiarism",
       "texts/wikipedia/_raw/*/*.txt", "none stated; Wikipedia text CC BY-SA"),
    _c("wiki_leipzig", "wiki", "julie-reine15/projet_translitteration",
       "rus_wikipedia_2021_10K-sentences.txt", "Leipzig CC BY 4.0; Wikipedia CC BY-SA"),
    _c("wiki_ud_gsd", "wiki", "UniversalDependencies/UD_Russian-GSD", "ru_gsd-ud-{dev,test}.conllu", "CC BY-SA 4.0"),
    _c("wikinews_nerel", "news", "nerel-ds/NEREL", "NEREL-v1.1/{train,dev,test}/*_text.txt", "Wikinews CC BY 2.5"),
    Source("reviews_wildberries", "reviews", "reviews/reviews_wildberries.jsonl.gz", "asspaev/ReviewPulse",
           "data/release/base.db", "MIT repo; Wildberries user content", kind="reviews"),
    Source("parus_val", "eval", "parus/val.jsonl", "RussianNLP/RussianSuperGLUE",
           "HumanBenchmark/PARus/assign_PARus.tsv", "MIT", kind="eval"),
]
SOURCES: dict[str, Source] = {s.name: s for s in _REGISTRY}
CORPUS: list[str] = [s.name for s in _REGISTRY if s.kind == "corpus"]  # the 23 pre-training sources, sorted


def register(name: str, spec: dict, where: str = "extra_sources") -> Source:
    """Add a corpus source described in the params file (no registry edit needed):
    `spec` has `role` (one of ROLES) and optionally `relpath` (default corpus/<name>/<name>.jsonl.gz),
    `repo`, `origin`, `license`. Re-registering the same description is a no-op; a clash with a
    different source of that name is an error naming `where`."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}.{name}: expected a mapping with at least 'role', got {spec!r}")
    allowed = {"role", "relpath", "repo", "origin", "license"}
    bad = sorted(set(spec) - allowed)
    if bad or spec.get("role") not in ROLES:
        raise ValueError(f"{where}.{name}: unknown key(s) {bad} or role {spec.get('role')!r}; "
                         f"keys: {sorted(allowed)}, roles: {list(ROLES)}")
    src = Source(name, spec["role"], spec.get("relpath", f"corpus/{name}/{name}.jsonl.gz"), spec.get("repo", "local"),
                 spec.get("origin", ""), spec.get("license", "not stated"))
    old = SOURCES.get(name)
    if old is not None and old != src:
        raise ValueError(f"{where}.{name}: a different source of that name is already registered ({old})")
    SOURCES[name] = src
    return src


class SourceError(OSError):
    """A source file that is missing or unreadable as a whole (the message names it)."""


class SourceWarning(UserWarning):
    """A source that read without error but gave nothing (an empty file)."""


def locate(name: str, root=None, base_url: str | None = None, cache_dir=None) -> Path:
    """Path of source `name`: `<root>/<relpath>` (root defaults to gmlib.paths.data_dir()),
    else `<cache_dir>/<relpath>` downloaded from `<base_url>/<relpath>` (base_url defaults to
    $GM_DATA_URL). Raises SourceError naming every place it looked."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    rel = SOURCES[name].relpath
    root = Path(root) if root is not None else data_dir()
    tried = []
    if root is not None:
        p = root / rel
        if p.is_file():
            return p
        tried.append(str(p))
    base_url = base_url or os.environ.get("GM_DATA_URL")
    if base_url:
        from gmlib.paths import work_dir
        cache = Path(cache_dir) if cache_dir is not None else work_dir("download_cache")
        p = cache / rel
        if not p.is_file():
            download(f"{base_url.rstrip('/')}/{rel}", p)
        return p
    raise SourceError(f"source {name!r}: no file at {' or '.join(tried) or '(no data dir)'} and no base URL "
                      f"to download from (set GM_DATA_DIR or GM_DATA_URL)")


def download(url: str, dest, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` atomically (a failed download leaves nothing at `dest`)."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, atomic.atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise SourceError(f"download of {url} to {dest} failed: {e}") from e
    return dest


@dataclass
class ReadStats:
    """What the reader met in one file; merged into the audit."""
    lines: int = 0
    docs: int = 0
    bytes: int = 0                 # UTF-8 bytes of the `text` fields yielded
    undecodable_lines: int = 0     # had invalid UTF-8 or a lone surrogate, kept with U+FFFD
    bad_json: int = 0              # skipped
    no_text: int = 0               # skipped: no string `text`
    truncated: int = 0             # 1 if the gzip stream ended early or failed its CRC (what came before is kept)
    empty_file: int = 0            # 1 if the file held no records at all
    errors: list = field(default_factory=list)  # a few messages, for the audit

    def as_dict(self):
        return asdict(self)


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads turns pairs into one character: these are lone


def iter_records(path, max_bytes: int | None = None, stats: ReadStats | None = None):
    """Yield the JSON records (dicts with a str `text`) of a .jsonl or .jsonl.gz file, in order,
    stopping once `max_bytes` of text have been yielded (the record crossing it is kept)."""
    path = Path(path)
    st = stats if stats is not None else ReadStats()
    try:
        numbered = jsonl.lines(path)  # checked up front, so a later gzip error is damage, not a wrong format
    except (FileNotFoundError, jsonl.NotGzip) as e:
        raise SourceError(str(e)) from None
    try:
        for _, raw in numbered:
            st.lines += 1
            if st.lines == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write: not part of the record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                st.undecodable_lines += 1
                _note(st, f"{path}:{st.lines}: invalid UTF-8, replaced")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                st.bad_json += 1
                _note(st, f"{path}:{st.lines}: not JSON ({e.msg})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                st.no_text += 1
                _note(st, f"{path}:{st.lines}: no string 'text' field")
                continue
            if any(isinstance(v, str) and _SURROGATE.search(v) for v in rec.values()):
                rec = {k: _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v for k, v in rec.items()}
                st.undecodable_lines += 1
                _note(st, f"{path}:{st.lines}: lone UTF-16 surrogate, replaced")
            st.docs += 1
            st.bytes += len(rec["text"].encode("utf-8"))
            yield rec
            if max_bytes is not None and st.bytes >= max_bytes:
                return
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        # the gzip stream ended early, or its CRC / length check failed at the end: keep what
        # was read, count it (the header was checked above, so this is damage, not a wrong format)
        st.truncated = 1
        _note(st, f"{path}: truncated or corrupt gzip after {st.lines} lines ({e})")
    finally:
        numbered.close()  # the file, also when the caller stops early
        if st.lines == 0 and not st.truncated:
            st.empty_file = 1
            _note(st, f"{path}: empty file (0 records)")
            warnings.warn(f"{path}: empty file, 0 records read", SourceWarning, stacklevel=2)


def _note(st: ReadStats, msg: str, keep: int = 5):
    if len(st.errors) < keep:
        st.errors.append(msg)


def read_source(name: str, max_bytes: int | None = None, stats: ReadStats | None = None, **locate_kw):
    """Records of source `name` (see `locate` for where it is found)."""
    return iter_records(locate(name, **locate_kw), max_bytes=max_bytes, stats=stats)
