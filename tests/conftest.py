"""Shared pytest fixtures built from REAL documents of the corpus (gmlib.paths.data_dir()/corpus).

  real_docs            ~400 cleaned documents {"text", "source"} from every corpus source
                       (books and long articles cut into chunks of at most ~2,000 characters)
  tiny_tokenizer_path  a SentencePiece unigram model (byte fallback, vocab 1000) trained on them
  tiny_shards          a folder with train/ val/ test/ token shard sets (gmlib.data format):
                       every document as [bos] + ids with its UTF-8 byte count and source id;
                       source ids index `TokenShards(...).sources` (sorted source names)

Everything is session-scoped and builds in a few seconds. Without the shared data folder the
tests that use them are skipped with the reason.
"""
import pytest

from gmlib.paths import data_dir

N_PER_SOURCE = 18       # 23 sources -> about 400 documents
MAX_CHARS = 2000        # long documents are cut into chunks of at most this many characters


def _corpus_root():
    root = data_dir()
    if root is None or not (root / "corpus").is_dir():
        pytest.skip("no shared corpus: set GM_DATA_DIR to a folder with corpus/<source>/<source>.jsonl.gz")
    return root


def _chunks(text: str, max_chars: int):
    """Cut at paragraph (else line, else space) boundaries into pieces of <= max_chars."""
    while len(text) > max_chars:
        cut = max(text.rfind("\n\n", 0, max_chars), text.rfind("\n", 0, max_chars), text.rfind(" ", 0, max_chars))
        cut = cut if cut > max_chars // 4 else max_chars
        yield text[:cut].strip()
        text = text[cut:].strip()
    if text.strip():
        yield text.strip()


@pytest.fixture(scope="session")
def real_docs():
    from data_prep import sources
    from data_prep.clean import CleanConfig, clean_text, doc_filter
    root = _corpus_root()
    cfg = CleanConfig()
    docs = []
    for name in sources.CORPUS:
        src = sources.SOURCES[name]
        got = 0
        try:
            records = sources.iter_records(root / src.relpath, max_bytes=5_000_000)
            for rec in records:
                # a whole novel is megabytes: clean only its opening part
                text, _ = clean_text(rec["text"][:20 * MAX_CHARS], cfg)
                for chunk in _chunks(text, MAX_CHARS):
                    if doc_filter(chunk, src.role, cfg) is None:
                        docs.append({"text": chunk, "source": name})
                        got += 1
                    if got >= N_PER_SOURCE or (src.role == "books" and got % 6 == 0):
                        break  # at most 6 chunks of one book, so several books appear
                if got >= N_PER_SOURCE:
                    break
        except sources.SourceError:
            continue
    if len({d["source"] for d in docs}) < 5:
        pytest.skip(f"corpus at {root} yielded documents from fewer than 5 sources")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer_path(real_docs, tmp_path_factory):
    from data_prep import tokenizer
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer.train([d["text"] for d in real_docs], path, tokenizer.TokenizerConfig(vocab_size=1000, num_threads=1))
    return path


@pytest.fixture(scope="session")
def tiny_shards(real_docs, tiny_tokenizer_path, tmp_path_factory):
    """Root folder with train/, val/, test/ (split by text hash: 80/10/10)."""
    from data_prep import tokenizer
    from data_prep.split import SPLITS, split_of
    from gmlib.data import ShardWriter
    sp = tokenizer.load(tiny_tokenizer_path)
    names = sorted({d["source"] for d in real_docs})
    root = tmp_path_factory.mktemp("shards")
    by_split = {s: [] for s in SPLITS}
    for d in real_docs:
        by_split[split_of(d["text"], val_frac=0.1, test_frac=0.1)].append(d)
    for split, docs in by_split.items():
        with ShardWriter(root / split, vocab_size=sp.get_piece_size(), sources=names) as w:
            for d in docs:
                w.add([sp.bos_id()] + sp.encode(d["text"]), source=names.index(d["source"]),
                      nbytes=len(d["text"].encode("utf-8")))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one torch thread (and the CPU is shared); restored after."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
