"""Cleaning one document: normalise, strip markup and boilerplate, then decide keep or drop.

`clean_text` repairs and normalises the text (ftfy for mojibake, HTML entities and control
characters, then NFC), removes HTML tags, Telegram/Markdown/AsciiDoc markup, wiki reference
markers, URLs and @mentions, boilerplate lines ("Читайте также", "Подписывайтесь", ...),
lines without a single letter (page numbers, rules), re-joins hard-wrapped lines (pdf2text,
plain-text novels), and tidies whitespace.

`doc_filter` then applies the document rules in a fixed order and names the first that fails:
  empty         nothing left after cleaning
  too_short     fewer than `min_words` words
  not_russian   Cyrillic share of letters below `min_cyrillic`, or Ukrainian/Belarusian letters
  stop_words    fewer than `min_stop_words` occurrences of Russian stop words
  word_length   mean word length outside [min_mean_word_len, max_mean_word_len]
  dup_lines     share of lines that repeat an earlier line above `max_dup_line_frac`
  line_punct    share of lines ending in terminal punctuation below `min_line_punct`
  newline_ratio newlines per word above `max_newline_ratio`
The last five carry FineWeb-2's Russian thresholds as defaults. Those filters were tuned on web
crawl; a play (one speaker line per line) or a poem fails `dup_lines` / `newline_ratio` by
design, and a one-line Wikipedia sentence often has a single stop word, so they apply only to
sources whose role is in `quality_roles` (crawled and user-generated text). Every source gets
the normalisation, markup removal, length and language rules.

Why not a language-ID library: lingua or fastText would tell Russian from Ukrainian or
Bulgarian more reliably, but every source here is meant to be Russian, so the filter only has
to catch the odd English, Ukrainian or markup-only document. A Cyrillic share, a check for
letters that exist in Ukrainian/Belarusian but not in Russian (і ї є ґ ў), and the stop-word
rule do that with two regex passes, at hundreds of MB/s, with no model to ship.
"""
import html
import re
import unicodedata
from dataclasses import dataclass, field

import ftfy

RULES = ("empty", "too_short", "not_russian", "stop_words", "word_length", "dup_lines", "line_punct", "newline_ratio")

# the most frequent Russian function words (a subset of common stop-word lists)
STOP_WORDS = frozenset("""и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только
ее её мне было вот от меня еще ещё нет о из ему теперь когда даже ну ли если уже или ни быть был него до вас
нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их чем была сам
чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого какой совсем ним здесь этом
один почти мой тем чтобы нее сейчас были куда зачем всех никогда можно при наконец два об другой хоть после
над больше тот через эти нас про всего них какая много разве три эту моя впрочем хорошо свою этой перед иногда
лучше чуть том нельзя такой им более всегда конечно всю между это""".split())


@dataclass
class CleanConfig:
    min_words: int = 5                  # the corpus has sentence- and tweet-level sources on purpose
    min_cyrillic: float = 0.5           # share of letters that are Cyrillic
    max_foreign_cyrillic: float = 0.01  # share of Cyrillic letters that are і ї є ґ ў (Ukrainian/Belarusian)
    min_stop_words: int = 2             # FineWeb-2 (Gopher rule)
    min_mean_word_len: float = 3.0      # FineWeb-2 Russian
    max_mean_word_len: float = 11.0     # FineWeb-2 Russian
    max_dup_line_frac: float = 0.322    # FineWeb-2 Russian
    min_line_punct: float = 0.231       # FineWeb-2 Russian
    max_newline_ratio: float = 0.139    # FineWeb-2 Russian
    quality_roles: tuple = ("web", "news", "social", "reviews")
    unwrap_lines: bool = True
    strip_urls: bool = True
    strip_mentions: bool = True


# --- normalisation and markup -------------------------------------------------------------

_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|table|h[1-6]|blockquote|pre)\b[^<>]{0,300}>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]{0,500})?/?>")
_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>«»\"']+", re.I)
_MENTION = re.compile(r"(?<![\w.])@\w{2,}:?")
_RT = re.compile(r"(?m)^RT\s*:?\s*")
_MD_LINK = re.compile(r"\[([^\]\n]{1,300})\]\((?:[^()\s]{1,500})\)")
_MD_EMPH = re.compile(r"(\*\*|__|~~|\|\|)(?=\S)(.{1,2000}?)(?<=\S)\1", re.S)
_WIKI_REF = re.compile(r"\[(?:\d{1,3}|[a-zа-я]|примечание \d+|источник не указан[^\]]*|нет в источнике|править[^\]]*)\]", re.I)
_ASCIIDOC_INDEX = re.compile(r"\(\(\(.*?\)\)\)")
_ASCIIDOC_LINE = re.compile(r"^(?:\[\[?[^\u0400-\u04ff\]]*\]\]?|-{4,}|={4,}|\.{4,}|\*{4,}|_{4,}|\+{4,}|(?:image|include|ifdef|endif|ifndef)::.*|:[\w-]+:.*|\(\(\(.*\)\)\)|<<[^>]*>>)$")
_ASCIIDOC_HEAD = re.compile(r"^(=+|\.(?=[А-ЯA-Z]))\s*")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_INVISIBLE = re.compile(r"[\u200b-\u200d\u2060\ufeff\ufffd\u00ad]")
_MANY_NL = re.compile(r"\n{3,}")
_LETTER = re.compile(r"[^\W\d_]")
_BOILERPLATE = re.compile(
    r"^(?:читайте также|читать также|смотрите также|подписывайтесь|подпишитесь|подписаться|подпишись|"
    r"поделиться|поделитесь|источник|фото|видео|реклама|erid|все права защищены|©|\(c\)|copyright|"
    r"наш канал|наш телеграм|прислать новость|предложить новость|ещё больше новостей|больше новостей|"
    r"развернуть|свернуть|показать полностью|читать далее|читать полностью|подробнее|далее|"
    r"comments?|комментари|ответить|цитировать|нравится|like|share|tags?:|теги:|метки:)\b",
    re.I)


def normalize(text: str) -> str:
    """ftfy repair (mojibake, entities, control characters, CRLF) and NFC composition.
    Curly quotes are kept: Russian typography uses them on purpose."""
    text = ftfy.fix_text(text, uncurl_quotes=False, fix_line_breaks=True, normalization="NFC")
    return unicodedata.normalize("NFC", text)


def strip_markup(text: str, cfg: CleanConfig) -> str:
    text = _SCRIPT.sub(" ", text)
    text = _COMMENT.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    for _ in range(2):  # double-escaped entities (&amp;quot;) are common in scraped text
        if "&" not in text:
            break
        text = html.unescape(text)
    text = _MD_LINK.sub(r"\1", text)
    if cfg.strip_urls:
        text = _URL.sub("", text)
    if cfg.strip_mentions:
        text = _RT.sub("", text)
        text = _MENTION.sub("", text)
    text = _MD_EMPH.sub(r"\2", text)
    text = _WIKI_REF.sub("", text)
    if "(((" in text:
        text = _ASCIIDOC_INDEX.sub("", text)
    return text


def clean_lines(text: str, cfg: CleanConfig) -> tuple[str, int]:
    """Line-level cleanup: whitespace, markup-only and boilerplate lines, hard wraps.
    Returns the text and the number of boilerplate/markup lines removed."""
    text = _INVISIBLE.sub("", text)
    out, removed = [], 0
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if not line:
            out.append("")
            continue
        if _ASCIIDOC_LINE.match(line) or not _LETTER.search(line) or (len(line) < 120 and _BOILERPLATE.match(line)):
            removed += 1
            continue
        out.append(_ASCIIDOC_HEAD.sub("", line) if line[0] in "=." else line)
    if cfg.unwrap_lines:
        out = _unwrap(out)
    text = _MANY_NL.sub("\n\n", "\n".join(out)).strip()
    return text, removed


_END = tuple(".!?…:;»\"')]>—–-*")


def _unwrap(lines: list[str]) -> list[str]:
    """Join a line with the next when it was evidently wrapped mid-sentence: the line is long,
    does not end a sentence, and the next starts with a lower-case letter. A word hyphenated
    across the break is re-joined. Verse and dialogue rarely meet all three conditions."""
    out = []
    for line in lines:
        if out and line and line[0].islower() and len(out[-1]) >= 40:
            prev = out[-1]
            if prev[-1] == "-" and len(prev) > 1 and prev[-2].isalpha():
                out[-1] = prev[:-1] + line
                continue
            if not prev.endswith(_END):
                out[-1] = prev + " " + line
                continue
        out.append(line)
    return out


def clean_text(text: str, cfg: CleanConfig | None = None) -> tuple[str, int]:
    """Normalised, markup-free text and the number of lines removed as boilerplate/markup."""
    cfg = cfg or CleanConfig()
    return clean_lines(strip_markup(normalize(text), cfg), cfg)


# --- document rules -------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_CYR = re.compile(r"[\u0400-\u04ff]")
_FOREIGN_CYR = re.compile(r"[іїєґўІЇЄҐЎ]")
_PUNCT_END = tuple(".!?…\"'»)")


def doc_filter(text: str, role: str = "web", cfg: CleanConfig | None = None) -> str | None:
    """Name of the first rule the cleaned `text` fails, or None to keep it."""
    cfg = cfg or CleanConfig()
    if not text.strip():
        return "empty"
    words = _WORD.findall(text)
    if len(words) < cfg.min_words:
        return "too_short"
    n_letters = len(_LETTER.findall(text))
    n_cyr = len(_CYR.findall(text))
    if n_letters == 0 or n_cyr < cfg.min_cyrillic * n_letters or len(_FOREIGN_CYR.findall(text)) > cfg.max_foreign_cyrillic * n_cyr:
        return "not_russian"
    if role not in cfg.quality_roles:
        return None
    if sum(1 for w in words if w.lower() in STOP_WORDS) < cfg.min_stop_words:
        return "stop_words"
    mean_len = sum(map(len, words)) / len(words)
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "word_length"
    lines = [l for l in text.split("\n") if l.strip()]
    if len(lines) > 1 and (len(lines) - len(set(lines))) / len(lines) > cfg.max_dup_line_frac:
        return "dup_lines"
    if sum(1 for l in lines if l.endswith(_PUNCT_END)) / len(lines) < cfg.min_line_punct:
        return "line_punct"
    if text.count("\n") / len(words) > cfg.max_newline_ratio:
        return "newline_ratio"
    return None
