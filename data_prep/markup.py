"""Repairing one document's text and stripping its markup (data_prep.clean runs these first).

`normalize`: ftfy (UTF-8 mojibake, HTML entities, control characters, CRLF) and NFC, then
`repair_mojibake` for lines that ftfy cannot fix (cp1251 text read as Latin-1, KOI8-R text read
as cp1251). `protect_code` sets code blocks aside (AsciiDoc `----`/`....`, Markdown ```,
`inline code`) so that nothing below touches them, `restore_code` puts them back fenced with ```.
`strip_markup` removes HTML tags and declarations, embed scripts and tweet-embed residue,
Telegram/Markdown/AsciiDoc markup, wiki reference markers, URLs, @mentions and placeholders, and
`mask_pii` replaces personal data (e-mail, phone, passport-like numbers) by a placeholder token.
The settings come from data_prep.clean.CleanConfig.
"""
from __future__ import annotations  # CleanConfig is named in annotations only

import html
import re
import unicodedata
from typing import TYPE_CHECKING

import ftfy

from .quality import STOP_WORDS

if TYPE_CHECKING:
    from .clean import CleanConfig

# Placeholder tokens for masked personal data (kept in the text so the sentence still reads).
EMAIL_TOKEN, PHONE_TOKEN, ID_TOKEN = "[EMAIL]", "[PHONE]", "[ID]"



# --- mojibake -------------------------------------------------------------------------------

# a run of Latin-1 letters (cp1251 Cyrillic read as Latin-1 lands in À-ÿ), or a lower-case
# Cyrillic letter followed by capitals (KOI8-R read as cp1251 swaps the case of every letter)
_MOJI_SUSPECT = re.compile(r"[\u00c0-\u00ff]{3}|(?<![^\W\d_])[а-яё][А-ЯЁ]{2}")
_MOJI_REPAIRS = (("latin-1", "cp1251"), ("cp1252", "cp1251"), ("cp1251", "koi8-r"))
_RU_WORD = re.compile(r"(?<![^\W\d_])[а-яёА-ЯЁ]{2,}(?![^\W\d_])")
_LATIN1_RUN = re.compile(r"[\u00c0-\u00ff]+")  # cp1251 Cyrillic bytes 0xC0-0xFF read as Latin-1


def _russianness(s: str) -> float:
    """Lower-case and Capitalised Russian words (1), ALL-CAPS ones (0.5), stop words (+2): mojibake
    of either kind yields no Russian words or words of mixed case ("ьФП")."""
    score = 0.0
    for w in _RU_WORD.findall(s):
        if w.islower():
            score += 3 if w in STOP_WORDS else 1
        elif w[1:].islower():
            score += 1
        elif w.isupper():
            score += 0.5
    return score


def _latin1_runs(line: str) -> str:
    return _LATIN1_RUN.sub(lambda m: m.group(0).encode("latin-1").decode("cp1251"), line)


def repair_mojibake(text: str) -> str:
    """Repair, line by line, cp1251 text read as Latin-1 (or cp1252) and KOI8-R text read as cp1251.
    A line is re-decoded only when the round trip is exact and the result is clearly more
    Russian (_russianness more than doubles); otherwise it is left as it is."""
    if not _MOJI_SUSPECT.search(text):
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not _MOJI_SUSPECT.search(line):
            continue
        best, score = line, _russianness(line)
        for enc, dec in (*_MOJI_REPAIRS, (None, None)):
            try:  # (None, None): only the runs of Latin-1 letters (a line that also has Greek or math signs)
                cand = line.encode(enc).decode(dec) if enc else _latin1_runs(line)
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            s = _russianness(cand)
            if s > 2 * score + 0.25:  # a lone ALL-CAPS word (0.5) from a line with no Russian at all counts
                best, score = cand, s
        lines[i] = best
    return "\n".join(lines)


def normalize(text: str) -> str:
    """ftfy repair (UTF-8 mojibake, entities, control characters, CRLF), line-wise repair of
    single-byte mojibake, and NFC composition. Curly quotes are kept: Russian typography uses them."""
    text = ftfy.fix_text(text, uncurl_quotes=False, fix_line_breaks=True, normalization="NFC")
    return unicodedata.normalize("NFC", repair_mojibake(text))


# --- code blocks ----------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"(?m)^(----|\.\.\.\.|```)[^\n]*\n.*?\n\1[ \t]*$", re.S)
_INLINE_CODE = re.compile(r"(?<!`)`[^`\n]{1,200}`(?!`)")
_CODE_MARK = re.compile(r"\ue000(\d+)\ue001")  # private-use characters: never in real text


def protect_code(text: str, mask: bool = True) -> tuple[str, list[str]]:
    """Replace code blocks and inline code by markers, so markup stripping and line re-joining
    never touch them. A block becomes a marker line of its own and comes back fenced with ```
    (whatever its fences were); personal data is masked in code too (`mask`)."""
    if "`" not in text and "----" not in text and "...." not in text:
        return text, []
    saved = []

    def block(m):
        code = m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        saved.append("```\n" + (mask_pii(code) if mask else code) + "\n```")
        return f"\ue000{len(saved) - 1}\ue001CODE"

    def inline(m):
        saved.append(m.group(0))
        return f"\ue000{len(saved) - 1}\ue001"
    text = _CODE_BLOCK.sub(block, text)
    text = _INLINE_CODE.sub(inline, text)
    return text, saved


def restore_code(text: str, saved: list[str]) -> str:
    if not saved:
        return text
    text = text.replace("\ue001CODE", "\ue001")
    return _CODE_MARK.sub(lambda m: saved[int(m.group(1))], text)


# --- markup -----------------------------------------------------------------------------------

_SCRIPT = re.compile(r"<(script|style|noscript|iframe)\b.*?</\1\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_DECL = re.compile(r"<[!?][^<>]{0,500}>")  # <!DOCTYPE ...>, <?xml ...?>
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|table|h[1-6]|blockquote|pre)\b[^<>]{0,300}>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]{0,500})?/?>")
_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>«»\"']*"
                  r"|(?<![\w@.])(?:[\w-]+\.)+(?:com|ru|org|net|me|ly|io|su|info|tv|рф)/[^\s<>«»\"']*", re.I)
_ENTITY_LEFT = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,5});")
_MENTION = re.compile(r"(?<![\w.])@\w{2,}:?")
_RT = re.compile(r"(?m)^RT\s*:?\s*")
_TWEET_EMBED = re.compile(r"(?m)^[ \t]*— [^\n]{0,80}\(@\w+\)[ \t]*(?:\n[ \t]*\d{1,2} \w+ \d{4}(?: г\.)?[ \t]*$)?")
_MD_LINK = re.compile(r"\[([^\]\n]{0,300})\]\((?:[^()\s]{1,500})\)")
_MD_EMPH = re.compile(r"(\*\*|__|~~|\|\|)(?=\S)(.{1,2000}?)(?<=\S)\1", re.S)
_MD_LEFTOVER = re.compile(r"\*{2,}|_{2,}|~~|\|\|")
_WIKI_REF = re.compile(r"\[(?:\d{1,3}|[a-zа-я]|примечание \d+|источник не указан[^\]]*|нет в источнике|"
                       r"править[^\]]*)\]", re.I)
_PLACEHOLDER = re.compile(r"\[(?:USER|USERNAME|URL|LINK|ССЫЛКА|ИМЯ|\*{3}|ссылка[^\]\n]{0,80}|id\d+\|)\]", re.I)
_ASCIIDOC_INDEX = re.compile(r"\(\(\(.*?\)\)\)")
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})*\.[a-zа-я]{2,12}(?![\w-])", re.I)
_PHONE = re.compile(r"(?=[+8(])(?<![\w+])(?:\+7|8|\+\d{1,3})[ \t(-]{0,2}\d{3,4}[ \t)-]{0,2}\d{2,3}"
                    r"[ \t-]?\d{2}[ \t-]?\d{2}(?!\d)"
                    r"|(?<![\w+])\(\d{3,5}\)[ \t]?\d{1,3}[ \t-]?\d{2}[ \t-]?\d{2}(?!\d)")
_PASSPORT = re.compile(r"(?i)(паспорт\w*|серия)([^\n\d]{0,20})\d{2}[ \t]?\d{2}[ \t№]{0,3}(?:номер[ \t]*)?\d{6}(?!\d)")


def mask_pii(text: str) -> str:
    """E-mail addresses, phone numbers and passport-like numbers -> placeholder tokens."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_TOKEN, text)
    text = _PASSPORT.sub(lambda m: m.group(1) + m.group(2) + ID_TOKEN, text)
    return _PHONE.sub(PHONE_TOKEN, text)


def strip_markup(text: str, cfg: CleanConfig) -> str:
    if "<" in text:
        text = _SCRIPT.sub(" ", text)
        text = _COMMENT.sub(" ", text)
        text = _DECL.sub(" ", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub("", text)
    for _ in range(2):  # double-escaped entities (&amp;quot;) are common in scraped text
        if "&" not in text:
            break
        text = html.unescape(text)
    if "&" in text:  # what is left is misspelt (&egarve;) or unknown: it cannot be decoded
        text = _ENTITY_LEFT.sub("", text)
    if "](" in text:
        text = _MD_LINK.sub(r"\1", text)
    if cfg.strip_urls:
        text = _URL.sub("", text)
    if "[" in text:
        text = _PLACEHOLDER.sub("", text)
    if cfg.mask_pii:
        text = mask_pii(text)
    if cfg.strip_mentions and "@" in text:
        text = _TWEET_EMBED.sub("", text)
        text = _RT.sub("", text)
        text = _MENTION.sub("", text)
    if "*" in text or "_" in text or "~" in text or "|" in text:
        text = _MD_EMPH.sub(r"\2", text)
        text = _MD_LEFTOVER.sub("", text)
    if "[" in text:
        text = _WIKI_REF.sub("", text)
    if "(((" in text:
        text = _ASCIIDOC_INDEX.sub("", text)
    return text
