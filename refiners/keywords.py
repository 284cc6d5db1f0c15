"""The keyword matcher: the one place that decides whether an output contains a keyword.

A keyword counts when it, or a regular inflection of its last word, appears as whole words,
case-insensitively: dance / dances / danced / dancing; city / cities; stop / stopped / stopping.
Irregular forms (ran, stood) do not count. The keyword-coverage term and the benchmark both use it.
"""

from __future__ import annotations

import re
from functools import lru_cache

_VOWELS = set("aeiou")


def _ends_cvc(w: str) -> bool:
    # consonant-vowel-consonant ending (stop, plan): the final consonant may double before -ed/-ing.
    return len(w) >= 3 and w[-1] not in _VOWELS | set("wxy") and w[-2] in _VOWELS and w[-3] not in _VOWELS


def inflections(word: str) -> list[str]:
    """Regular inflections of ``word``, most common spelling first: [base, -s, -ed, -ing].

    These are the spellings a refinement may insert; ``keyword_forms`` adds the variants the matcher
    also accepts.
    """
    w = word.lower()
    if w.endswith(("s", "x", "z", "ch", "sh")):
        plural = w + "es"
    elif w.endswith("y") and len(w) > 1 and w[-2] not in _VOWELS:
        plural = w[:-1] + "ies"
    else:
        plural = w + "s"
    if w.endswith("e"):
        past = w + "d"
        if w.endswith("ie"):
            gerund = w[:-2] + "ying"
        elif w.endswith(("ee", "ye", "oe")):
            gerund = w + "ing"  # seeing, dyeing, hoeing
        else:
            gerund = w[:-1] + "ing"
    elif w.endswith("y") and len(w) > 1 and w[-2] not in _VOWELS:
        past, gerund = w[:-1] + "ied", w + "ing"
    elif _ends_cvc(w) and len(w) <= 4:
        past, gerund = w + w[-1] + "ed", w + w[-1] + "ing"
    else:
        past, gerund = w + "ed", w + "ing"
    return list(dict.fromkeys([w, plural, past, gerund]))


def keyword_forms(keyword: str) -> set[str]:
    """Every accepted spelling of ``keyword`` (lower case); a phrase inflects its last word."""
    words = keyword.lower().split()
    if not words:
        return set()
    head, last = words[:-1], words[-1]
    lasts = set(inflections(last)) | {last + "s", last + "es", last + "ed", last + "d", last + "ing"}
    if last.endswith("e") and not last.endswith(("ee", "ye", "oe")):
        lasts |= {last[:-1] + "ing", last[:-1] + "ed"}
    if _ends_cvc(last):
        lasts |= {last + last[-1] + "ed", last + last[-1] + "ing"}
    return {" ".join([*head, form]) for form in lasts}


@lru_cache(maxsize=4096)
def _pattern(keyword: str) -> re.Pattern[str]:
    forms = sorted(keyword_forms(keyword), key=len, reverse=True)
    alternatives = "|".join(r"\s+".join(map(re.escape, f.split())) for f in forms)
    # Whole words only: no letter or digit right before or after.
    return re.compile(rf"(?<![\w])(?:{alternatives})(?![\w])", re.IGNORECASE)


def keyword_present(keyword: str, text: str) -> bool:
    """True when ``keyword`` or a regular inflection of it appears in ``text`` as whole words.

    >>> keyword_present("dance", "Kids were dancing in the room.")
    True
    >>> keyword_present("cat", "A category of things.")
    False
    """
    return bool(keyword.strip()) and _pattern(keyword.strip()).search(text) is not None


def keyword_spans(keyword: str, text: str) -> list[tuple[int, int]]:
    """The (start, end) character spans where ``keyword`` (or an inflection) appears in ``text``."""
    if not keyword.strip():
        return []
    return [m.span() for m in _pattern(keyword.strip()).finditer(text)]


def coverage(keywords: list[str] | tuple[str, ...], text: str) -> float:
    """Fraction of ``keywords`` present in ``text`` (1.0 when there are none)."""
    if not keywords:
        return 1.0
    return sum(keyword_present(k, text) for k in keywords) / len(keywords)
