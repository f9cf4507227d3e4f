"""Word and phrase matching that ignores case, accents and script variants (pure).

Escalation keywords and request phrases, and the rules responder's ``match`` texts, are
written once by an operator and must find what users actually type: ``HUMANO!``,
``Atendênte``, ``أريد التحدث مع شخص`` without its hamza, all without firing on a word that
merely contains them (``agent`` must not match ``agenda``). So both sides are *folded* the
same way and compared as whole words:

- NFKD, upper-then-casefold, NFKD again; then combining marks (``Mn``/``Me``: accents,
  Arabic tashkeel, hamza above/below) and invisible format characters (``Cf``: zero-width
  joiners, soft hyphens) are dropped. Upper-then-casefold (not ``casefold`` alone) makes the
  Turkish dotless ``ı`` meet ``I`` like ``i`` does, so matching is invariant under any case
  change of the text (a hypothesis test checks it).
- Arabic: tatweel dropped, alef forms unified (``أ إ آ ٱ`` → ``ا``; NFKD plus mark removal
  already does most of it), ta marbuta ``ة`` → ``ه``, alef maqsura ``ى`` and Persian ``ی`` →
  ``ي``, Persian ``ک`` → ``ك``. Every decimal digit becomes its ASCII digit.
- Words are maximal runs of letters, digits and spacing marks (``Mc``, the vowel signs of
  Indic scripts); everything else -- spaces, punctuation, emoji, ``_`` -- separates words.
  Han ideographs and kana are one word each, since those scripts put no spaces between
  words (a keyword written in them matches as a run of characters).

A *phrase* matches when its words occur as a contiguous run of the text's words. A phrase
ending in ``*`` matches its last word as a prefix (``entreg*`` finds ``entrega``,
``entregam``): the stems the rules responder's default table relies on.
"""  # noqa: RUF002

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["Matcher", "Phrase", "fold", "words"]

_ARABIC = str.maketrans({
    "\u0640": None,  # tatweel
    "\u0623": "\u0627", "\u0625": "\u0627", "\u0622": "\u0627", "\u0671": "\u0627",  # alef forms
    "\u0629": "\u0647",  # ta marbuta → ha
    "\u0649": "\u064a", "\u06cc": "\u064a",  # alef maqsura, Persian ya → ya
    "\u06a9": "\u0643",  # Persian kaf → kaf
})
_DROP = frozenset({"Mn", "Me", "Cf"})


def _is_unspaced(char: str) -> bool:
    """Scripts written without spaces between words: each character is a word of its own."""
    code = ord(char)
    return (0x3040 <= code <= 0x30FF  # hiragana, katakana
            or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF  # CJK ideographs
            or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x3134F)


@functools.lru_cache(maxsize=8192)
def _fold_char(char: str) -> str:
    """One character of an already decomposed, case-folded text: itself, ``""`` (dropped),
    a digit, or a space (a word separator)."""
    category = unicodedata.category(char)
    if category in _DROP:
        return ""
    if category == "Nd":
        return str(unicodedata.decimal(char))
    if _is_unspaced(char):
        return f" {char} "
    if char.isalnum() or category == "Mc":
        return char
    return " "


_ASCII_WORD = re.compile(r"[a-z0-9]+")


def fold(text: str) -> str:
    """``text`` folded for matching: words separated by single spaces, nothing else.

    Never raises for any ``str`` (lone surrogates included); ``fold(fold(t)) == fold(t)``.
    """
    if text.isascii():  # the common case, 2-3 times faster; the same result
        return " ".join(_ASCII_WORD.findall(text.lower()))
    decomposed = unicodedata.normalize("NFKD", text)
    cased = unicodedata.normalize("NFKD", decomposed.upper().casefold())
    folded = "".join(map(_fold_char, cased)).translate(_ARABIC)
    return " ".join(folded.split())


def words(text: str) -> tuple[str, ...]:
    """The folded words of ``text``, in order."""
    return tuple(fold(text).split())


@attrs.frozen
class Phrase:
    """A keyword or phrase as configured (``text``, reported in reasons) and as matched."""

    text: str
    words: tuple[str, ...]
    prefix: bool = False  # the last word matches as a prefix (the text ended in ``*``)

    @classmethod
    def parse(cls, text: str) -> Phrase:
        """Fold ``text``; ``ValueError`` when it has no letters or digits to match."""
        folded = words(text)
        if not folded:
            raise ValueError(f"{text!r} has no letters or digits to match")
        return cls(text, folded, prefix=text.rstrip().endswith("*"))

    def occurs_at(self, text: Sequence[str], start: int) -> bool:
        """True when the phrase's words are ``text[start:...]``."""
        end = start + len(self.words)
        if end > len(text):
            return False
        *head, last = self.words
        if list(text[start:end - 1]) != head:
            return False
        return text[end - 1].startswith(last) if self.prefix else text[end - 1] == last


def _first_word_index(matcher: Matcher) -> dict[str, tuple[int, ...]]:
    index: dict[str, list[int]] = {}
    for i, p in enumerate(matcher.phrases):
        if not (p.prefix and len(p.words) == 1):
            index.setdefault(p.words[0], []).append(i)
    return {word: tuple(ids) for word, ids in index.items()}


def _prefix_words(matcher: Matcher) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(matcher.phrases) if p.prefix and len(p.words) == 1)


@attrs.frozen
class Matcher:
    """A list of phrases compiled once, searched many times.

    The search costs one dictionary lookup per word of the text (plus the comparison of the
    few phrases starting with that word), whatever the number of phrases; when several
    occur, the one configured first wins, so the result does not depend on the text's order.
    """

    phrases: tuple[Phrase, ...]
    _by_first: dict[str, tuple[int, ...]] = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_first_word_index, takes_self=True))
    _prefixes: tuple[int, ...] = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_prefix_words, takes_self=True))

    @classmethod
    def of(cls, texts: Iterable[str]) -> Matcher:
        """Compile ``texts``; ``ValueError`` names one that can never match."""
        return cls(tuple(Phrase.parse(t) for t in texts))

    def first_index(self, text: Sequence[str]) -> int | None:
        """The position of the earliest configured phrase that occurs in the folded words
        ``text``."""
        best = len(self.phrases)
        for start, word in enumerate(text):
            for i in self._by_first.get(word, ()):
                if i < best and self.phrases[i].occurs_at(text, start):
                    best = i
        for i in self._prefixes:
            if i < best and any(w.startswith(self.phrases[i].words[0]) for w in text):
                best = i
        return best if best < len(self.phrases) else None

    def first(self, text: Sequence[str]) -> Phrase | None:
        """The earliest configured phrase that occurs in the folded words ``text``."""
        i = self.first_index(text)
        return None if i is None else self.phrases[i]

    def search(self, text: str) -> Phrase | None:
        """:meth:`first` over the words of a raw ``text``."""
        return self.first(words(text))
