"""Check functions of the verifiable requirements: small pure functions ``(response, **kwargs)``.

The IFEval checkers (Zhou et al. 2023, arXiv 2311.07911) follow the reference implementation
(``instruction_following_eval/instructions.py``) rule for rule, with these documented
differences:

* IFEval counts sentences with nltk's punkt model and tokenizes capital words with nltk's
  ``word_tokenize``; neither needs to be downloaded here. :func:`split_sentences` is a regex
  splitter (rules below) and :func:`capital_words` a regex tokenizer. Word counting is
  identical to IFEval (``RegexpTokenizer(r"\\w+")`` is a plain regex).
* Keywords, forbidden words, section splitters and custom postscript markers are matched
  literally (``re.escape``); IFEval passes them to ``re`` unescaped, which only differs for
  strings containing regex metacharacters.
* The IFEval evaluator fails every instruction on an empty (all-whitespace) response; that
  rule lives in ``catalogue.check_strict``/``check_loose``, not in the functions here.

The ``ecd:`` checkers are this project's own; their rules are given in each docstring.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
TWO_RESPONSES_SEPARATOR = "******"


def compare(count: int, relation: str, threshold: int) -> bool:
    """IFEval's relations: ``less than`` is ``count < threshold``, ``at least`` is ``>=``."""
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


# --- text units ---------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Runs of word characters (Unicode ``\\w+``), exactly IFEval's ``count_words``.

    ``café`` and ``naïve`` are one word each; ``don't`` is two (as in IFEval); emoji and
    punctuation are not words.
    """
    return len(_WORD.findall(text))


# A sentence ends at a run of terminal punctuation, optionally followed by closing quotes,
# brackets or markdown emphasis, that is followed by whitespace or the end of the text; the
# full-width terminators of Chinese and Japanese need no whitespace after them.
_TERMINATOR = re.compile(
    r"[.!?…]+[\"'”’)\]*_`]*(?=\s|$)|[。！？]+[\"'”’)\]」』*_`]*"
)
# Periods after these (case-insensitive) do not end a sentence.
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "capt", "lt", "col", "gen",
    "sgt", "rev", "inc", "ltd", "co", "corp", "mt", "ft", "approx", "fig", "no",
})
_INITIALISM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # e.g, i.e, U.S, P.S, P.P.S


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the single period at ``text[dot]`` belongs to an abbreviation or list marker."""
    line_start = text.rfind("\n", 0, dot) + 1
    before = text[line_start:dot]
    m = re.search(r"(\S+)$", before)
    if m is None:
        return False
    token = m.group(1).lstrip("([{\"'“‘*_")
    if token.lower() in ABBREVIATIONS or _INITIALISM.fullmatch(token):
        return True
    if re.fullmatch(r"[^\W\d_]", token):  # a single initial: "J. K. Rowling"
        return True
    # an ordered-list marker at the start of a line: "1. Mix the flour"
    return token.isdigit() and not before[: m.start(1)].strip()


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with regular expressions (stand-in for nltk punkt).

    Rules: a sentence ends at ``.``, ``!``, ``?`` or ``…`` (a run of them counts once, so
    ``...`` and ``?!`` end one sentence), optionally followed by closing quotes, brackets or
    markdown ``*``/``_``, when whitespace or the end of the text follows; ``。！？`` end a
    sentence without following whitespace. A single
    period does not end a sentence after a common abbreviation (``Dr.``, ``Mrs.``, ``vs.``, see
    :data:`ABBREVIATIONS`), an initialism (``e.g.``, ``i.e.``, ``U.S.``, ``P.S.``), a single
    initial (``J. K.``) or an ordered-list marker at the start of a line (``1.``). Decimals
    (``3.5``) and web addresses (``example.com``) are not split since no whitespace follows
    their period. Line breaks are whitespace (as in punkt), so list items without terminal
    punctuation run into the next sentence. Pieces without any word character are dropped.
    """
    pieces: list[str] = []
    start = 0
    for m in _TERMINATOR.finditer(text):
        mark = m.group().rstrip("\"'”’)]*_`")
        if mark == "." and _is_abbreviation(text, m.start()):
            continue
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if _WORD.search(p)]


def count_sentences(text: str) -> int:
    """Number of sentences by :func:`split_sentences`."""
    return len(split_sentences(text))


def capital_words(text: str) -> list[str]:
    """Tokens written in capital letters (stand-in for nltk ``word_tokenize`` + ``isupper``).

    A token is a run of word characters, possibly joined by inner hyphens, apostrophes or
    periods (``COVID-19``, ``DON'T``, ``U.S.A``, ``P.S``): hyphenated words count once, as in
    IFEval. A token counts when ``str.isupper()`` holds, so single capitals such as ``I`` and
    ``A`` count, and digits alone do not.
    """
    tokens = re.findall(r"\w+(?:[-'’.]\w+)*", text)
    return [t for t in tokens if t.isupper()]


def paragraphs_by_blank_lines(text: str) -> list[str]:
    """Non-empty blocks separated by one or more blank lines."""
    return [p for p in re.split(r"\n[^\S\n]*\n", text) if p.strip()]


@functools.lru_cache(maxsize=1)
def _langdetect() -> Any:
    try:
        import langdetect
    except ImportError as e:  # pragma: no cover - langdetect is a dependency
        raise ImportError("language checks need the 'langdetect' package") from e
    langdetect.DetectorFactory.seed = 0  # deterministic detection, as IFEval runs it
    return langdetect


def detect_language(text: str) -> str | None:
    """ISO 639-1 code by ``langdetect`` (seeded), or None where it finds no features."""
    ld = _langdetect()
    try:
        return ld.detect(text)
    except ld.LangDetectException:
        return None


# --- IFEval: keywords ---------------------------------------------------------------------

def keywords_existence(response: str, keywords: Sequence[str]) -> bool:
    """Every keyword occurs (case-insensitive, also inside longer words)."""
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """Case-insensitive occurrences of ``keyword`` (also inside longer words) vs ``frequency``."""
    n = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return compare(n, relation, frequency)


def keywords_forbidden_words(response: str, forbidden_words: Sequence[str]) -> bool:
    """No forbidden word occurs as a whole word (case-insensitive)."""
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)
        for w in forbidden_words
    )


def keywords_letter_frequency(response: str, letter: str, let_frequency: int,
                              let_relation: str) -> bool:
    """Case-insensitive count of ``letter`` vs ``let_frequency``."""
    n = Counter(response.lower())[letter.strip().lower()]
    return compare(n, let_relation, let_frequency)


# --- IFEval: language, length -------------------------------------------------------------

def response_language(response: str, language: str) -> bool:
    """``langdetect`` finds ``language``; text it cannot classify passes (as in IFEval)."""
    found = detect_language(response)
    return True if found is None else found == language


def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` parts separated by the markdown divider ``***``.

    An empty part is allowed only first or last (a leading or trailing divider).
    """
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(response: str, num_words: int, relation: str) -> bool:
    return compare(count_words(response), relation, num_words)


_FIRST_WORD_STOP = frozenset(".,?!'\"")


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int,
                             first_word: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs split on ``"\\n\\n"``; paragraph ``nth_paragraph``
    (from 1) starts with ``first_word`` (case-insensitive, trailing punctuation ignored)."""
    paragraphs = re.split(r"\n\n", response)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for ch in word:
        if ch in _FIRST_WORD_STOP:
            break
        found += ch.lower()
    return count == num_paragraphs and found == first_word.lower()


# --- IFEval: detectable content and format ------------------------------------------------

def number_placeholders(response: str, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as ``[address]``."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, postscript_marker: str) -> bool:
    """The marker occurs (case-insensitive); ``P.S.`` and ``P.P.S`` allow inner spaces."""
    value = response.lower()
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` lines starting with ``*`` (not ``**``) or ``-``."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(response: str) -> bool:
    """The response contains one of :data:`CONSTRAINED_RESPONSE_OPTIONS`."""
    value = response.strip()
    return any(option in value for option in CONSTRAINED_RESPONSE_OPTIONS)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-empty ``*text*`` spans (``**text**`` also count)."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    count += sum(
        1 for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
        if h.removeprefix("**").removesuffix("**").strip()
    )
    return count >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` sections, each started by e.g. ``Section 2`` (case-sensitive)."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The response is JSON, optionally inside a markdown code fence."""
    value = (
        response.strip()
        .removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
        .removeprefix("```").removesuffix("```").strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A non-empty title in double angular brackets on one line: ``<<poem of joy>>``."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# --- IFEval: combination, start/end, case, punctuation --------------------------------------

def two_responses(response: str) -> bool:
    """Exactly two different non-empty responses separated by ``******``."""
    valid = []
    parts = response.split(TWO_RESPONSES_SEPARATOR)
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    """The response starts with the prompt, word for word (case-insensitive)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, end_phrase: str) -> bool:
    """The response ends with ``end_phrase`` (case-insensitive; outer double quotes ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """Number of :func:`capital_words` vs ``capital_frequency``."""
    return compare(len(capital_words(response)), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    """All cased characters are capitals and the text is English (undetectable passes)."""
    if not response.isupper():
        return False
    found = detect_language(response)
    return found is None or found == "en"


def english_lowercase(response: str) -> bool:
    """All cased characters are lowercase and the text is English (undetectable passes)."""
    if not response.islower():
        return False
    found = detect_language(response)
    return found is None or found == "en"


def no_comma(response: str) -> bool:
    return "," not in response


def quotation(response: str) -> bool:
    """The stripped response starts and ends with a double quotation mark ``"``."""
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# --- ecd: the project's own -----------------------------------------------------------------

def word_count_range(response: str, min_words: int, max_words: int) -> bool:
    """``min_words <= count_words(response) <= max_words``."""
    return min_words <= count_words(response) <= max_words


_NUMBERED_LINE = re.compile(r"^[^\S\n]*(\d+)[.)][^\S\n]+\S", flags=re.MULTILINE)


def numbered_steps(response: str, num_steps: int) -> bool:
    """The lines starting ``1.`` (or ``1)``) ... are exactly ``1, 2, ..., num_steps`` in order."""
    numbers = [int(n) for n in _NUMBERED_LINE.findall(response)]
    return numbers == list(range(1, num_steps + 1))


def _table_cells(line: str) -> list[str] | None:
    s = line.strip()
    if "|" not in s:
        return None
    s = s.removeprefix("|").removesuffix("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", s)]


def _is_delimiter_row(cells: list[str]) -> bool:
    return all(re.fullmatch(r":?-+:?", c) for c in cells)


def table_body_rows(response: str) -> list[int]:
    """Body-row counts of the markdown tables in the response.

    A table is a header row with at least two ``|``-separated cells, then a delimiter row
    (``| --- | :-: |``) with the same number of cells, then the consecutive lines with that
    number of cells (outer pipes optional).
    """
    lines = response.splitlines()
    tables: list[int] = []
    i = 0
    while i + 1 < len(lines):
        head, delim = _table_cells(lines[i]), _table_cells(lines[i + 1])
        if head and delim and len(head) >= 2 and len(head) == len(delim) \
                and _is_delimiter_row(delim) and not _is_delimiter_row(head):
            j = i + 2
            while j < len(lines):
                cells = _table_cells(lines[j])
                if cells is None or len(cells) != len(head) or _is_delimiter_row(cells):
                    break
                j += 1
            tables.append(j - i - 2)
            i = j
        else:
            i += 1
    return tables


def markdown_table(response: str, min_rows: int) -> bool:
    """A markdown table (see :func:`table_body_rows`) with at least ``min_rows`` body rows."""
    return any(rows >= min_rows for rows in table_body_rows(response))


def max_sentence_words(response: str, max_words: int) -> bool:
    """No sentence has more than ``max_words`` words.

    Each line is split with :func:`split_sentences` separately, so list items, headings and
    table rows are units of their own.
    """
    return all(
        count_words(s) <= max_words
        for line in response.splitlines()
        for s in split_sentences(line)
    )


def final_summary_line(response: str, prefix: str) -> bool:
    """The last non-empty line starts with ``prefix`` (case-insensitive) and has words after it."""
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    if not lines:
        return False
    last, want = lines[-1], prefix.strip()
    return last.lower().startswith(want.lower()) and bool(_WORD.search(last[len(want):]))


def starts_with(response: str, phrase: str) -> bool:
    """The response starts with ``phrase`` (case-insensitive) followed by a non-word character."""
    text, want = response.lstrip(), phrase.strip()
    if not text.lower().startswith(want.lower()):
        return False
    rest = text[len(want):]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def numbers_in(text: str) -> list[str]:
    """Numbers written in digits (``42``, ``3.5``, ``1,000``); ordered-list markers excluded."""
    text = re.sub(r"^[^\S\n]*\d+[.)](?=\s)", "", text, flags=re.MULTILINE)
    return re.findall(r"\d+(?:[.,]\d+)*", text)


def include_numbers(response: str, num_numbers: int) -> bool:
    """At least ``num_numbers`` numbers in digits (see :func:`numbers_in`)."""
    return len(numbers_in(response)) >= num_numbers


def question_at_end(response: str) -> bool:
    """The response ends with ``?``, ignoring closing quotes, brackets and markdown emphasis."""
    return response.rstrip().rstrip("\"'”’)]*_`").rstrip().endswith(("?", "？"))


FIRST_PERSON = re.compile(
    r"\b(?:i(?!\.\w)|me|my|mine|myself|we|us|our|ours|ourselves)\b", flags=re.IGNORECASE
)


def no_first_person(response: str) -> bool:
    """No first-person pronoun (I, me, my, mine, myself, we, us, our, ours, ourselves), as whole
    words in any case (so ``I'm`` counts; the ``i`` of ``i.e.`` does not; ``US`` does)."""
    return FIRST_PERSON.search(response) is None


def markdown_headings(response: str, num_headings: int) -> bool:
    """At least ``num_headings`` ATX headings (``#`` to ``######``, a space, then text)."""
    found = re.findall(r"^ {0,3}#{1,6}[^\S\n]+\S", response, flags=re.MULTILINE)
    return len(found) >= num_headings


def max_paragraphs(response: str, max_paragraphs: int) -> bool:
    """At most ``max_paragraphs`` paragraphs (blocks separated by blank lines)."""
    return len(paragraphs_by_blank_lines(response)) <= max_paragraphs


EXAMPLE_MARKERS = re.compile(r"\bfor example\b|\bfor instance\b|\be\.g\.", flags=re.IGNORECASE)


def include_examples(response: str, num_examples: int) -> bool:
    """At least ``num_examples`` examples introduced by "for example", "for instance" or
    "e.g." (case-insensitive)."""
    return len(EXAMPLE_MARKERS.findall(response)) >= num_examples
