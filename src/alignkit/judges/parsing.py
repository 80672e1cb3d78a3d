"""Read a score or a choice out of what a judge model actually wrote.

Real answers are not ``4.5``. They are ``Score: 4.5\\nJustification: covers 3 of
the 4 points``, ``**Rating:** -3 (fairly rude)``, ``I'd give it 8/10``, an echo of
the instructions ("between 1.00 and 5.00") followed by a number, or garbage.
The rules, in order:

1. Echoed scale ranges (``between 1.00 and 5.00``, ``-5 to +5``, ``1-5``) are
   removed; any other range (``3-4``) counts as its midpoint.
2. A number labelled by a keyword wins, a label with a colon (``Score: 4``)
   before a label in a sentence (``a score of 5 would need...``); of several,
   the last one in range (the final verdict comes last: "Final score: 4").
3. Otherwise an answer that *starts* with a number is that number.
4. Otherwise the last number in range (justification first, verdict last).
5. ``X/Y`` and ``X out of Y`` read as X (the denominator is not a candidate).

A value outside the scale is *clamped* or *rejected* (counted as
``out_of_range``) by policy; nothing is a silent zero: when no number is found
the result is ``unparsable`` and the judge applies its configured fallback.

>>> parse_score("Score: 4.50\\nJustification: it covers 3 of the 4 points.", 1, 5).value
4.5
>>> parse_score("Rate: -4", -5, 5).value
-4.0
>>> parse_score("I cannot rate this.", 1, 5).status
'unparsable'
>>> parse_choice("After comparing both, (B) is better.")
'B'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OK, CLAMPED, OUT_OF_RANGE, UNPARSABLE = "ok", "clamped", "out_of_range", "unparsable"

_NUM = r"[-+]?\d+(?:\.\d+)?"
# A number that is not glued to a word ("GPT-4", "3rd", "v2.1", "1-5" inside a range).
_FREE_NUM = re.compile(rf"(?<![\w.\-+])({_NUM})(?![\w]|\.\d)")
_RANGE = re.compile(rf"(?:\b(?:between|from)\s+)?(?<![\w.\-+])({_NUM})\s*(?:\([^()\n]{{0,40}}\)\s*)?"
                    rf"(?:-|–|—|\bto\b|\band\b)\s*({_NUM})(?![\w]|\.\d)", re.IGNORECASE)
_FRACTION = re.compile(rf"(?<![\w.\-+])({_NUM})\s*(?:/|\bout of\b)\s*({_NUM})(?![\w]|\.\d)", re.IGNORECASE)
_KEYWORD = re.compile(r"\b(?:final\s+)?(?:score|scores|scored|rating|rate|rated|grade|graded|reward|toxicity|"
                      r"evaluation|verdict|answer|result|i\s+(?:would\s+)?give(?:\s+it)?)\b", re.IGNORECASE)
# Between a keyword and its number: a few non-digit characters ("Score: ", "rating of ", "rate this a ").
_GAP = re.compile(r"[^\d+\-\n]{0,24}?(?=[-+]?\d)")


@dataclass(frozen=True)
class ScoreParse:
    value: float | None  # None when unparsable or rejected as out of range
    status: str  # ok | clamped | out_of_range | unparsable
    raw_value: float | None = None  # the number read before clamping


@dataclass
class _Candidate:
    start: int
    end: int
    value: float


def _normalise(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("**", "").replace("__", "")
    return text.replace("`", "")


def _candidates(text: str, low: float, high: float) -> list[_Candidate]:
    """Numbers in reading order, with ranges and fractions folded into one value."""
    found: list[_Candidate] = []
    taken = [False] * (len(text) + 1)

    def claim(s: int, e: int) -> bool:
        if any(taken[s:e]):
            return False
        for i in range(s, e):
            taken[i] = True
        return True

    for m in _FRACTION.finditer(text):
        if claim(m.start(), m.end()):
            found.append(_Candidate(m.start(), m.end(), float(m.group(1))))
    for m in _RANGE.finditer(text):
        a, b = float(m.group(1)), float(m.group(2))
        if a >= b:  # "5-3" is not a range; read the numbers one by one
            continue
        if claim(m.start(), m.end()) and not (a == low and b == high):  # the echoed scale: drop it
            found.append(_Candidate(m.start(), m.end(), (a + b) / 2))
    for m in _FREE_NUM.finditer(text):
        if claim(m.start(1), m.end(1)):
            found.append(_Candidate(m.start(1), m.end(1), float(m.group(1))))
    return sorted(found, key=lambda c: c.start)


def parse_score(text: str, low: float, high: float, out_of_range: str = "reject") -> ScoreParse:
    """The judge's score on the scale [low, high]; see the module docstring for the rules."""
    if out_of_range not in ("reject", "clamp"):
        raise ValueError(f"out_of_range must be reject or clamp, got {out_of_range!r}")
    text = _normalise(text or "")
    cands = _candidates(text, low, high)
    if not cands:
        return ScoreParse(None, UNPARSABLE)

    def in_range(c: _Candidate) -> bool:
        return low <= c.value <= high

    # "Score: 4" (a label with a colon) outranks "a score of 5 would need...".
    labelled: dict[bool, list[_Candidate]] = {True: [], False: []}
    for k in _KEYWORD.finditer(text):
        gap = _GAP.match(text, k.end())
        if gap is None:
            continue
        at = gap.end()
        colon = ":" in gap.group(0) or "=" in gap.group(0)
        labelled[colon] += [c for c in cands if c.start == at or (c.start < at < c.end)]
    labelled_best = labelled[True] or labelled[False]
    if labelled_best:
        good = [c for c in labelled_best if in_range(c)]
        pick = good[-1] if good else labelled_best[-1]
    elif not text[:cands[0].start].strip(" \t\n\"'([*#:>"):
        pick = cands[0]  # the answer starts with its number
    else:
        good = [c for c in cands if in_range(c)]
        pick = good[-1] if good else cands[-1]
    if in_range(pick):
        return ScoreParse(pick.value, OK, pick.value)
    if out_of_range == "clamp":
        return ScoreParse(min(max(pick.value, low), high), CLAMPED, pick.value)
    return ScoreParse(None, OUT_OF_RANGE, pick.value)


# --------------------------------------------------------------------------- pairwise choices

_STRONG = [
    # "the answer is (A)", "Answer: B", "I prefer response A", "better response: (B)", "I choose B"
    re.compile(r"\b(?:answer|choice|verdict|winner|better(?:\s+response|\s+one|\s+option)?|prefer(?:red|ence)?|"
               r"choose|chose|pick|select)\s*(?:is|would\s+be|:|=)?\s*(?:response|option|assistant)?\s*"
               r"\(?\b([AB])\b\)?", re.IGNORECASE),
    # "(A) is better", "Response B is more helpful", "B is clearly less harmful"
    re.compile(r"(?:\bresponse\s+|\boption\s+|\()?\b([AB])\b\)?\s+is\s+(?:\w+\s+)?(?:better|preferable|preferred|"
               r"superior|more\s+\w+|less\s+\w+|the\s+better)", re.IGNORECASE),
]
_TIE = re.compile(r"\b(?:tie|equally|both\s+(?:are|responses\s+are)\s+(?:equally\s+)?(?:good|bad|fine|acceptable)|"
                  r"neither|no\s+preference|cannot\s+decide|can't\s+decide)\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` or None (unparsable) from a pairwise judge's answer.

    >>> [parse_choice(t) for t in ["(A)", "B", "Answer: (B)", "Both are equally good.", "hmm (A) or (B)?"]]
    ['A', 'B', 'B', 'tie', None]
    """
    text = _normalise(text or "").strip()
    strong = set()
    for pat in _STRONG:
        strong |= {m.group(1).upper() for m in pat.finditer(text) if m.group(1) in "AB"}
    if len(strong) == 1:
        return strong.pop()
    if len(strong) > 1:
        return None  # "A is better ... B is better": contradictory
    # "(A) ..." or a bare "B" / "B." / "B)": but not the article in "A response that ..."
    lead = re.match(r"^[\s\"'*#>]*(?:\(([AB])\)|([AB])(?:[.:,)!]|\s*$|\s*\n))", text)
    if lead:
        return lead.group(1) or lead.group(2)
    bracketed = {m.group(1) for m in re.finditer(r"\(([AB])\)", text)}
    if len(bracketed) == 1:
        return bracketed.pop()
    if _TIE.search(text):
        return "tie"
    return None


def flip(choice: str | None) -> str | None:
    """A choice read with the positions swapped, mapped back to the original order."""
    return {"A": "B", "B": "A"}.get(choice, choice)
