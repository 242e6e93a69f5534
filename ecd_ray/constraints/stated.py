"""Whether an instruction states a requirement: the evidence a rewritten instruction must carry.

In teacher mode an LLM rewrites the instruction to add a drawn requirement; the chain records the
requirement's id and kwargs, so the rewrite must actually say it. :func:`stated` looks for the
minimal evidence of each type in the instruction text: its defining values (counts as digits or
number words, keywords, phrases, the language name) and its format words ("JSON", "bullet",
"<<", "lowercase", ...), case-insensitively. A count must stand within a few words of what it
counts ("3 bullet points", "bullet points: exactly three"), and a relation right before it ("at
least 3", "fewer than three") or after it ("3 or more"), so that a number elsewhere in the
instruction does not count.

The checks ask for evidence, not for understanding: a rewrite that names the values in a
contradicting sentence still passes. They are deliberately lenient about wording (the teacher may
paraphrase) and strict about values (a changed count or keyword fails).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ecd_ray.constraints.catalogue import LANGUAGE_NAMES

# --- numbers ---------------------------------------------------------------------------------

_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_SCALES = {"hundred": 100, "thousand": 1000}
# words that mean a count of their own ("at least twice", "a single example")
_SOLO = {"once": 1, "twice": 2, "thrice": 3, "single": 1, "a": 1, "an": 1}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
             "ninth", "tenth", "eleventh", "twelfth")

_NUMBER_WORD = re.compile(
    r"\b(" + "|".join(sorted([*_WORD_VALUE, *_SCALES, *_SOLO, "and"], key=len, reverse=True))
    + r")\b", re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d+)(?!\d|[.,]\d|(?:st|nd|rd|th)\b)",
                     re.IGNORECASE)
_JOIN = re.compile(r"[\s-]+")


def _kind(word: str) -> str:
    if word in _SCALES:
        return "scale"
    if word == "and":
        return "and"
    if word in _SOLO:
        return "solo"
    value = _WORD_VALUE[word]
    return "tens" if value >= 20 else "unit" if 0 < value < 10 else "small"


# which word kinds may follow which inside one number ("two hundred and fifty", "twenty-one")
_FOLLOWS = {
    "tens": {"unit", "scale"}, "unit": {"scale"}, "small": {"scale"},
    "scale": {"unit", "small", "tens", "and", "scale"}, "and": {"unit", "small", "tens"},
    "article": {"scale"},
}


def _word_number_value(words: list[str]) -> int:
    total = current = 0
    for w in words:
        if w in _SCALES:
            if _SCALES[w] == 1000:
                total, current = (total + max(current, 1)) * 1000, 0
            else:
                current = max(current, 1) * 100
        elif w in _WORD_VALUE:
            current += _WORD_VALUE[w]
    return total + current


def numbers(text: str) -> list[tuple[int, tuple[int, int]]]:
    """The counts written in ``text``, as digits or words (any case), with their spans.

    ``"two hundred and fifty"`` is 250, ``"twenty-one"`` 21, ``"1,000"`` 1000; ``"a"``, ``"an"``,
    ``"single"`` and ``"once"`` are 1, ``"twice"`` 2, ``"thrice"`` 3.
    """
    found = [(int(m.group(1).replace(",", "")), m.span()) for m in _DIGITS.finditer(text)]
    group: list[tuple[str, tuple[int, int]]] = []

    def close() -> None:
        while group and group[-1][0] == "and":
            group.pop()
        if group:
            words = [w for w, _ in group]
            value = _SOLO[words[0]] if len(words) == 1 and words[0] in _SOLO else \
                _word_number_value(words)
            found.append((value, (group[0][1][0], group[-1][1][1])))
        group.clear()

    for m in _NUMBER_WORD.finditer(text):
        word = m.group(1).lower()
        kind = "article" if word in ("a", "an") else _kind(word)
        if group:
            prev = "article" if group[-1][0] in ("a", "an") else _kind(group[-1][0])
            adjacent = _JOIN.fullmatch(text[group[-1][1][1]:m.start()]) is not None
            if adjacent and kind in _FOLLOWS.get(prev, set()):
                group.append((word, m.span()))
                continue
            close()
        if kind != "and":
            group.append((word, m.span()))
    close()
    return found


def _ordinals(text: str) -> list[tuple[int, tuple[int, int]]]:
    out = [(int(m.group(1)), m.span())
           for m in re.finditer(r"\b(\d+)(?:st|nd|rd|th)\b", text, re.IGNORECASE)]
    for i, word in enumerate(_ORDINALS, start=1):
        out += [(i, m.span()) for m in re.finditer(rf"\b{word}\b", text, re.IGNORECASE)]
    return out


# --- proximity -------------------------------------------------------------------------------

Span = tuple[int, int]
_FAR = 10**6


def _words_between(text: str, a: Span, b: Span) -> int:
    """Words between two spans; ``_FAR`` across the end of a sentence."""
    lo, hi = (a[1], b[0]) if a[1] <= b[0] else (b[1], a[0])
    if lo >= hi:
        return 0
    if re.search(r"[.!?](?:\s|$)", text[lo:hi]):
        return _FAR
    return len(re.findall(r"\w+", text[lo:hi]))


def _spans(pattern: str, text: str) -> list[Span]:
    return [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]


def _near(text: str, span: Span, pattern: str, window: int, side: str = "any") -> bool:
    """Whether ``pattern`` matches within ``window`` words of ``span`` (on ``side`` of it)."""
    for other in _spans(pattern, text):
        if side == "before" and other[1] > span[0] or side == "after" and other[0] < span[1]:
            continue
        if _words_between(text, span, other) <= window:
            return True
    return False


# an upper bound that includes the count ("at most 20 words", "20 words or fewer")
_AT_MOST = (r"\bat most\b|(?:\b(?:no|not|never|none)\b|n't\b)(?:\W+\w+){0,6}?\W+"
            r"(?:more|longer) than\b|\bmaximum\b|\bmax\b|\bup to\b|\bexceed|\bwithin\b|"
            r"\blimit|\bcap\b|\bunder\b|\b(?:fewer|less|shorter) than\b")
# relation -> (pattern right before the count, pattern right after it)
_RELATIONS: dict[str, tuple[str, str]] = {
    "at least": (r"\bat least|\bno (?:fewer|less) than|\bnot (?:fewer|less) than|"
                 r"\bminimum(?: of)?|\bmin\b\.?|(?<!\bno )(?<!\bnot )\bmore than",  # implies it
                 r"\+|\bor (?:more|above|greater)\b|\bat (?:the )?(?:very )?least\b|"
                 r"\bminimum\b"),
    "less than": (r"(?<!\bno )(?<!\bnot )\b(?:less|fewer) than|\bunder\b|\bbelow\b", r"(?!)"),
    "at most": (_AT_MOST, r"\bor (?:fewer|less)\b|\bat most\b|\bmaximum\b|\bmax\b"),
}
# a number right after one of these words labels a thing ("paragraph 3", "Section 2"): no count
_LABEL = re.compile(r"\b(?:paragraph|section|point|step|item|part|heading|sentence|example|row|"
                    r"line|response|answer|number|no\.|#)\s*$", re.IGNORECASE)


def _count(text: str, n: int, noun: str, what: str, relation: str | None = None,
           window: int = 6) -> str | None:
    """A count ``n`` of ``noun`` (a pattern; ``what`` names it), with ``relation`` ("at least",
    "less than", "at most") right before or after it if given.

    The count of a noun is the nearest number before it within ``window`` words in the same
    sentence, else the nearest within 3 words after it: in "4 paragraphs and 3 bullet points"
    the paragraphs count 4, and in "6 numbered steps (1., 2., ...)" the steps count 6.
    """
    counts = [(v, s) for v, s in numbers(text)
              if not _LABEL.search(text, max(0, s[0] - 16), s[0])]
    if not any(v == n for v, _ in counts):
        return f"the count {n} ({what}) is missing"
    spans = []
    for noun_span in _spans(noun, text):
        gaps = [(s[0] > noun_span[0], _words_between(text, s, noun_span), v, s)
                for v, s in counts]
        gaps = [g for g in gaps if g[1] <= (min(window, 3) if g[0] else window)]
        if gaps and min(gaps)[2] == n:
            spans.append(min(gaps)[3])
    if not spans:
        return f"the count {n} is not next to {what}"
    if relation is None:
        return None
    before, after = _RELATIONS[relation]
    for s in spans:
        if _near(text, s, before, 3, "before") or _near(text, s, after, 1, "after"):
            return None
    return f'"{relation} {n}" ({what}) is missing'


def _has(text: str, pattern: str, what: str) -> str | None:
    return None if re.search(pattern, text, re.IGNORECASE) else f"{what} is missing"


def _phrase(text: str, phrase: str, what: str) -> str | None:
    found = _clean(phrase).lower() in text.lower()
    return None if found else f'{what} "{phrase.strip()}" is missing'


def _word(text: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(_clean(word)), text, re.IGNORECASE) is not None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def _clean(text: str) -> str:
    """Straight quotes and single spaces (the checks match case-insensitively)."""
    text = text.translate(str.maketrans("“”„‟«»‘’‚‛", "\"\"\"\"\"\"''''"))
    return re.sub(r"\s+", " ", text).strip()


# --- the checks, one per requirement type -----------------------------------------------------
# Each takes (kwargs, instruction with straight quotes and single spaces) and matches
# case-insensitively, except for the case-sensitive section marker.

_TIMES = r"\btimes?\b|\boccurrences?\b|\binstances?\b|\bonce\b|\btwice\b|\bthrice\b"
_END = r"\bend|\bfinish|\blast\b|\bfinal|\bclos(?:e|ing)\b|\bconclu"
_START = r"\bbegin|\bstart|\bopen|\bfirst\b"
_CAPITALS = (r"(?<!no )(?<!without )(?<!any )\bcapital letters\b|\ball capitals?\b|"
             r"\ball[\s-]caps\b|\bupper[\s-]?case\b|\bblock letters\b|\bcapitali[sz]ed\b")
_NEGATION = (r"\bnot\b|n't\b|\bno\b|\bnever\b|\bwithout\b|\bavoid|\bforbid|\bexclud|\brefrain|"
             r"\bomit|\bban|\bnone\b|\bnor\b")
_LANGUAGE_ALIASES = {"fa": ("farsi",), "pa": ("panjabi",), "bn": ("bangla",)}


def _existence(kw: Mapping[str, Any], t: str) -> str | None:
    missing = [k for k in kw["keywords"] if not _word(t, k)]
    return f"keyword(s) {', '.join(map(repr, missing))} missing" if missing else None


def _frequency(kw: Mapping[str, Any], t: str) -> str | None:
    if not _word(t, kw["keyword"]):
        return f"keyword {kw['keyword']!r} missing"
    return _count(t, kw["frequency"], _TIMES + r"|" + re.escape(_clean(kw["keyword"])),
                  f'occurrences of "{kw["keyword"]}"', kw["relation"])


def _forbidden(kw: Mapping[str, Any], t: str) -> str | None:
    missing = [w for w in kw["forbidden_words"] if not _word(t, w)]
    if missing:
        return f"forbidden word(s) {', '.join(map(repr, missing))} missing"
    return _has(t, _NEGATION, "a prohibition (not, avoid, without, ...)")


def _letter(kw: Mapping[str, Any], t: str) -> str | None:
    letter = re.escape(kw["letter"].strip().lower())
    shown = rf"\bletters? \"?{letter}\b|[\"']{letter}[\"']"
    if not re.search(shown, t, re.IGNORECASE):
        return f"the letter {kw['letter']!r} is missing"
    return _count(t, kw["let_frequency"], _TIMES + "|" + shown, "occurrences of the letter",
                  kw["let_relation"])


def _language(kw: Mapping[str, Any], t: str) -> str | None:
    names = (LANGUAGE_NAMES[kw["language"]].lower(), *_LANGUAGE_ALIASES.get(kw["language"], ()))
    if any(re.search(rf"\b{n}\b", t, re.IGNORECASE) for n in names):
        return None
    return f"the language name {LANGUAGE_NAMES[kw['language']]} is missing"


def _nth_paragraph(kw: Mapping[str, Any], t: str) -> str | None:
    problem = _first(_count(t, kw["num_paragraphs"], r"\bparagraphs?\b", "paragraphs"),
                     None if _word(t, kw["first_word"])
                     else f"the first word {kw['first_word']!r} is missing")
    if problem is not None:
        return problem
    nth, para = kw["nth_paragraph"], r"\bparagraphs?\b"
    spots = [s for v, s in _ordinals(t) if v == nth]
    if any(_near(t, s, para, 1, "after") for s in spots):
        return None  # "the second paragraph", "2nd paragraph"
    cardinals = [s for v, s in numbers(t) if v == nth]
    if any(_near(t, s, para + r"(?: number| no\.?)?", 0, "before") for s in cardinals):
        return None  # "paragraph 2", "paragraph number 2"
    if nth == kw["num_paragraphs"] and re.search(r"\b(?:last|final) paragraph", t, re.IGNORECASE):
        return None
    if nth == 1 and re.search(r"\b(?:begin|start)\w* (?:your |the )?(?:response|answer)", t,
                            re.IGNORECASE):
        return None
    return f"which paragraph ({nth}) starts with {kw['first_word']!r} is missing"


def _postscript(kw: Mapping[str, Any], t: str) -> str | None:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\bp\. ?p\. ?s\b"
    elif marker == "P.S.":
        pattern = r"(?<!p\.)(?<!p\. )\bp\. ?s\b"  # not the tail of P.P.S
    else:
        pattern = re.escape(_clean(marker))
    return _has(t, pattern, f"the postscript marker {marker}")


def _sections(kw: Mapping[str, Any], t: str) -> str | None:
    spliter = kw["section_spliter"].strip()
    if not re.search(rf"\b{re.escape(spliter)}\b", t):  # case-sensitive, as in the checker
        return f"the section marker {spliter!r} (case-sensitive) is missing"
    return _count(t, kw["num_sections"], r"\bsections?\b|\bparts?\b", "sections")


def _end_phrase(kw: Mapping[str, Any], t: str) -> str | None:
    return _first(_phrase(t, kw["end_phrase"], "the end phrase"),
                  _has(t, _END, "where the phrase goes (end, finish, last, ...)"))


def _word_range(kw: Mapping[str, Any], t: str) -> str | None:
    words = r"\bwords?\b"
    problem = _count(t, kw["max_words"], words, "words (maximum)")
    if problem is not None:
        return problem
    highs = [s for v, s in numbers(t) if v == kw["max_words"]]
    lows = [s for v, s in numbers(t) if v == kw["min_words"]]
    if any(lo[0] < hi[0] and _words_between(t, lo, hi) <= 3 for lo in lows for hi in highs):
        return None  # "between 50 and 200 words", "50-200 words"
    return _count(t, kw["min_words"], words, "words (minimum)")


# (kwargs, instruction) -> None when stated, else what is missing
StatedCheck = Callable[[Mapping[str, Any], str], str | None]

STATED_CHECKS: dict[str, StatedCheck] = {
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": _letter,
    "language:response_language": _language,
    "length_constraints:number_sentences": lambda kw, t: _count(
        t, kw["num_sentences"], r"\bsentences?\b", "sentences", kw["relation"]),
    "length_constraints:number_paragraphs": lambda kw, t: _first(
        _count(t, kw["num_paragraphs"], r"\bparagraphs?\b", "paragraphs"),
        _has(t, r"\*\*\*", "the divider ***")),
    "length_constraints:number_words": lambda kw, t: _count(
        t, kw["num_words"], r"\bwords?\b", "words", kw["relation"]),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,
    "detectable_content:number_placeholders": lambda kw, t: _first(
        _count(t, kw["num_placeholders"], r"\bplaceholders?\b|\bbrackets?\b|\bblanks?\b",
               "placeholders"),
        _has(t, r"\[|\bsquare brackets?\b", "square brackets")),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda kw, t: _first(
        _has(t, r"\bbullet", "the word bullet"),
        _count(t, kw["num_bullets"], r"\bbullet\w*|\bpoints?\b|\bitems?\b", "bullet points")),
    "detectable_format:constrained_response": lambda kw, t: next((
        f'the option "my answer is {o}." is missing' for o in ("yes", "no", "maybe")
        if f"my answer is {o}" not in t.lower()), None),
    "detectable_format:number_highlighted_sections": lambda kw, t: _first(
        _has(t, r"\bhighlight|\bitalic|\bemphasi|\*[^*\s]", "highlighting (highlight, *...*)"),
        _count(t, kw["num_highlights"],
               r"\bhighlight\w*|\bitalic\w*|\bemphasi\w*|\bsections?\b|\bparts?\b|"
               r"\bphrases?\b|\bpassages?\b|\bpoints?\b", "highlighted sections")),
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": lambda kw, t: _has(t, r"\bjson\b", "JSON"),
    "detectable_format:title": lambda kw, t: _has(
        t, r"<<|\bangular brackets?\b|\bangle brackets?\b", "a title in <<double angular "
        "brackets>>"),
    "combination:two_responses": lambda kw, t: _first(
        _has(t, r"\*{6}|\b(?:six|6) asterisks?\b", "the separator ******"),
        _count(t, 2, r"\bresponses?\b|\banswers?\b|\bversions?\b|\breplies\b", "responses")),
    "combination:repeat_prompt": lambda kw, t: _has(t, r"\brepeat", "repeating the request"),
    "startend:end_checker": _end_phrase,
    "startend:quotation": lambda kw, t: _has(t, r"\bquot", "double quotation marks"),
    "change_case:capital_word_frequency": lambda kw, t: _count(
        t, kw["capital_frequency"], _CAPITALS + r"|\bcapital\w*|\bcaps\b|" + _TIMES,
        "capital words", kw["capital_relation"]),
    "change_case:english_capital": lambda kw, t: _has(t, _CAPITALS, "all capital letters"),
    "change_case:english_lowercase": lambda kw, t: _has(
        t, r"\blower[\s-]?case\b|\bsmall letters\b|\bno capital|\bwithout (?:any )?capital",
        "lowercase"),
    "punctuation:no_comma": lambda kw, t: _has(t, r"\bcommas?\b", "no commas"),
    "ecd:word_count_range": _word_range,
    "ecd:numbered_steps": lambda kw, t: _first(
        _count(t, kw["num_steps"], r"\bsteps?\b|\bitems?\b|\bpoints?\b|\bstages?\b", "steps"),
        _has(t, r"\bnumber|\b1[.)]", "numbering (numbered, 1.)")),
    "ecd:markdown_table": lambda kw, t: _first(
        _has(t, r"\btables?\b", "a table"),
        _count(t, kw["min_rows"], r"\brows?\b|\bentries\b|\blines?\b", "table rows")),
    "ecd:max_sentence_words": lambda kw, t: _first(
        _has(t, r"\bsentences?\b", "sentences"),
        _count(t, kw["max_words"], r"\bwords?\b", "words per sentence", "at most")),
    "ecd:final_summary_line": lambda kw, t: _first(
        _phrase(t, kw["prefix"], "the summary prefix"),
        _has(t, _END, "where the summary goes (end, last line, ...)")),
    "ecd:starts_with": lambda kw, t: _first(
        _phrase(t, kw["phrase"], "the opening phrase"),
        _has(t, _START, "where the phrase goes (begin, start, ...)")),
    "ecd:include_numbers": lambda kw, t: _count(
        t, kw["num_numbers"], r"\bnumbers?\b|\bfigures?\b|\bdigits?\b|\bnumeric\w*|\bvalues?\b|"
        r"\bstatistics?\b|\bdata points?\b", "numbers in digits"),
    "ecd:question_at_end": lambda kw, t: None if any(
        _near(t, s, _END, 10) for s in _spans(r"\bquestion|\bask", t))
        else "a question at the end is missing",
    "ecd:no_first_person": lambda kw, t: _has(
        t, r"\bfirst[\s-]?person\b|\bimpersonal|\bpronouns?\b|\"i\"|\bi, me\b",
        "no first person"),
    "ecd:markdown_headings": lambda kw, t: _first(
        _has(t, r"\bheading|\bheader|#", "markdown headings"),
        _count(t, kw["num_headings"], r"\bheadings?\b|\bheaders?\b|\bsections?\b",
               "headings")),
    "ecd:max_paragraphs": lambda kw, t: _count(
        t, kw["max_paragraphs"], r"\bparagraphs?\b", "paragraphs", "at most"),
    "ecd:include_examples": lambda kw, t: _first(
        _count(t, kw["num_examples"], r"\bexamples?\b|\binstances?\b|\billustrations?\b",
               "examples"),
        _has(t, r"\bfor example\b|\bfor instance\b|\be\.g\.", 'the marker "for example"')),
}


def stated(req_id: str, kwargs: Mapping[str, Any], instruction: str) -> str | None:
    """None when ``instruction`` states requirement ``req_id`` with ``kwargs``; otherwise a
    short reason naming what is missing (e.g. ``'the count 3 is not next to bullet points'``).

    Raises KeyError for an id with no check (every catalogue type has one).
    """
    try:
        check = STATED_CHECKS[req_id]
    except KeyError:
        raise KeyError(f"no statedness check for requirement type {req_id!r}") from None
    return check(kwargs, _clean(instruction))
