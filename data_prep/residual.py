"""The residual-junk scan: what is still left in the *kept* text, per document, by kind.

The detectors are deliberately wider than the cleaning rules in clean.py (a keyword anywhere
in a line rather than at its start, any tag-like or entity-like string, any bare domain with
a path), so a zero here says more than "the cleaner removed what the cleaner looks for".
Kinds (a document counts once per kind):
  footer         a short line (at most 10 words) with a call to subscribe or a channel footer
  credit         a line starting with ©/(c)/Copyright/Теги:/Tags:/Метки:/Фото:/Источник:, or a ©/(c) photo
                 credit of an agency or press service anywhere (a quote attribution in a review,
                 "…» © Джокер", is the reviewer's text, not a credit line)
  html           an HTML tag, declaration or entity
  url            a URL, www. address or bare domain with a path (t.me/..., bit.ly/...)
  email_phone    an e-mail address or a phone number (the placeholders clean.py puts in do not count)
  mojibake       UTF-8 read as cp1251/Latin-1 (Р°, Ð°), cp1251 read as Latin-1 (àáâ runs),
                 KOI8-R read as cp1251 (a lower-case letter before capitals), or U+FFFD
  repeated_line  a line of at least 5 words that occurs more than 3 times, its copies making at least
                 1% of the document's lines (shorter lines, such as a play's speaker names, chapter
                 headings or "— Да.", repeat by nature; so does a song's refrain inside a novel)
"""
import re
from collections import Counter

VERSION = 1  # bump when a detector changes: the split stage (which runs the scan) is redone
KINDS = ("footer", "credit", "html", "url", "email_phone", "mojibake", "repeated_line")

_FOOTER = re.compile(r"(?<!\w)(?:подпис(?:ывайтесь|ывайся|аться|ка на)|подпиши(?:тесь|сь)|ставьте лайк|ставь лайк|"
                     r"присл(?:ать|ите) новость|предложить новость|наш (?:канал|телеграм)|читайте нас|читать нас|"
                     r"читайте также|смотрите также|subscribe)(?!\w)", re.I)
_CREDIT = re.compile(r"(?m)^[^\w]{0,12}(?:©|\([cс]\)|copyright(?!\w)|все права защищены|"
                     r"(?:теги|tags?|метки|фото|источник)\s*:)"
                     r"|(?:©|\([cс]\))[^\n]{0,40}(?:reuters|ap|afp|тасс|риа|rt|getty|global ?look|wikimedia|"
                     r"shutterstock|"
                     r"pixabay|sputnik|пресс-служба|кадр)(?!\w)", re.I)
_HTML = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]{0,15}(?:\s[^<>\n]{0,200})?/?>|<![^<>\n]{0,200}>"
                   r"|&(?:#\d{2,6}|#x[0-9a-f]{2,5}|[a-z]{2,8});",
                   re.I)
_URL = re.compile(r"https?://|ftp://|(?<!\w)www\.|(?<![\w@])(?:[\w-]+\.)+(?:com|ru|org|net|me|ly|io|su|info|tv|рф)/",
                  re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}|8)[\s(-]{0,2}\d{3}[\s)-]{0,2}\d{2,3}[\s-]?\d{2}[\s-]?\d{2}(?!\d)"
                    r"|(?<!\d)\(\d{3,5}\)\s?\d{1,3}-\d{2}-\d{2}(?!\d)")
# UTF-8 Cyrillic read as cp1251 gives Р or С followed by one of the cp1251 letters of bytes 0x80-0xBF
# (Р° Рµ Сѓ С‚ ...; not Рё, which starts "Рёв"); read as Latin-1, Ð or Ñ followed by a C1 or Latin-1 sign
_MOJIBAKE = re.compile(r"Р[°±µ¶·ЃЋЌ]|С[Ђ‚ѓ„†‡€‰Љ‹ЊЌЋЏђ]|Ð[\u0080-\u009f°±²³´µ¶·¸¹º»¼½¾¿]|Ñ[\u0080-\u009f]|"
                       r"[\u00c0-\u00ff]{4}|(?<![^\W\d_])[а-яё][А-ЯЁ]{3}|\ufffd")
_CODE = re.compile(r"(?ms)^```\n.*?\n```$|`[^`\n]{1,200}`")


def scan(text: str) -> set[str]:
    """The residual kinds present in one cleaned document (code blocks and `inline code` are not
    scanned: a URL or a <placeholder> in a command is content)."""
    if "`" in text:
        text = _CODE.sub(" ", text)
    found = set()
    if _FOOTER.search(text) and any(_FOOTER.search(ln) and len(ln.split()) <= 10 for ln in text.split("\n")):
        found.add("footer")
    if _CREDIT.search(text):
        found.add("credit")
    if ("<" in text or "&" in text) and _HTML.search(text):
        found.add("html")
    if _URL.search(text):
        found.add("url")
    if ("@" in text and _EMAIL.search(text)) or _PHONE.search(text):
        found.add("email_phone")
    if _MOJIBAKE.search(text):
        found.add("mojibake")
    lines = [ln for ln in text.split("\n") if ln.count(" ") >= 4]
    if len(lines) > 3:
        top = Counter(lines).most_common(1)[0][1]
        if top > 3 and top >= 0.01 * text.count("\n"):
            found.add("repeated_line")
    return found


def first_line(text: str, kind: str) -> str:
    """The first offending line of a kind, for the audit's examples."""
    if kind == "repeated_line":
        lines = [ln for ln in text.split("\n") if ln.count(" ") >= 4]
        return Counter(lines).most_common(1)[0][0][:200] if lines else ""
    for line in text.split("\n"):
        if kind in scan(line):
            return line[:200]
    return ""
