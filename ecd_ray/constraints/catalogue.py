"""Verifiable requirements: id, keyword arguments, phrasings, a checker, and conflicts.

The catalogue holds all 25 instruction types of the IFEval taxonomy (Zhou et al. 2023,
arXiv 2311.07911) under their public ids and keyword-argument names, so that evolved prompts
can be scored with IFEval-compatible tooling, and the project's own types (ids ``ecd:...``).
The check functions live in :mod:`ecd_ray.constraints.checkers`.

Each type has a ``kwargs_schema`` giving the *valid* values of its keyword arguments (what
``validate_kwargs`` and ``check_strict`` accept, broad enough for the IFEval data) and a
``sample`` function drawing from narrower *sampling* ranges, chosen so that any set of
mutually compatible types is satisfiable together (the ranges are listed in
``SAMPLING_RANGES`` and in the comments of the samplers). Schema entries are:

* ``(int, lo, hi)``: an int (not a bool) with ``lo <= value <= hi`` (IFEval counts may be 0,
  as its ``build_description`` accepts them; it redraws negative ones at random);
* ``(str, lo, hi)``: a string whose stripped length is within ``[lo, hi]``;
* ``(list, lo, hi)``: a list (or tuple) of ``lo`` to ``hi`` non-empty strings;
* ``("a", "b", ...)``: one of these strings.

``check_strict`` and ``check_loose`` follow the IFEval evaluator: an empty response fails,
and the loose check also tries the response without its first and/or last line and with
every ``*`` removed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ecd_ray.constraints import checkers as ck

Kwargs = dict[str, Any]
ArgSpec = tuple[Any, ...]

RELATIONS = ck.RELATIONS


@dataclass(frozen=True)
class RequirementType:
    """One checkable kind of requirement."""

    id: str
    sample: Callable[[random.Random], Kwargs]  # draws valid keyword arguments
    phrasings: tuple[str, ...]  # str.format templates over the kwargs
    # check(response, **kwargs) -> bool: the bare rule; check_strict/check_loose add kwargs
    # validation and IFEval's "an empty response fails" rule
    check: Callable[..., bool]
    conflicts: frozenset[str] = field(default_factory=frozenset)
    is_format: bool = False  # a candidate of the change_format operation
    kwargs_schema: Mapping[str, ArgSpec] = field(default_factory=dict, hash=False)
    evolvable: bool = True  # whether evolution may draw it (compatible_types)
    # extra check across kwargs: an error message, or None when the kwargs are consistent
    cross_check: Callable[[Kwargs], str | None] | None = field(default=None, compare=False)
    # extra str.format fields derived from the kwargs (e.g. a language name for its code)
    display: Callable[[Kwargs], Kwargs] | None = field(default=None, compare=False)

    def phrase(self, kwargs: Kwargs, rng: random.Random) -> str:
        """One of the phrasings, filled with ``kwargs`` (lists shown as quoted words)."""
        shown = {
            k: ", ".join(f'"{w}"' for w in v) if isinstance(v, (list, tuple)) else v
            for k, v in kwargs.items()
        }
        if self.display is not None:
            shown |= self.display(kwargs)
        return rng.choice(self.phrasings).format(**shown)

    def validate_kwargs(self, kwargs: Mapping[str, Any]) -> Kwargs:
        """A checked copy of ``kwargs`` without None values; ValueError names a bad kwarg."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        for name in given:
            if name not in self.kwargs_schema:
                raise ValueError(
                    f"{self.id}: unknown kwarg {name!r} (expected {sorted(self.kwargs_schema)})"
                )
        out: Kwargs = {}
        for name, spec in self.kwargs_schema.items():
            if name not in given:
                raise ValueError(f"{self.id}: missing kwarg {name!r}")
            out[name] = _validate_value(self.id, name, spec, given[name])
        if self.cross_check is not None:
            problem = self.cross_check(out)
            if problem is not None:
                raise ValueError(f"{self.id}: {problem}")
        return out


def _validate_value(rid: str, name: str, spec: ArgSpec, value: Any) -> Any:
    kind = spec[0]
    bad = f"{rid}: kwarg {name!r}"
    if kind is int:
        lo, hi = spec[1], spec[2]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{bad} must be an int, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{bad} must be in [{lo}, {hi}], got {value!r}")
        return value
    if kind is str:
        lo, hi = spec[1], spec[2]
        if not isinstance(value, str):
            raise ValueError(f"{bad} must be a string, got {value!r}")
        if not lo <= len(value.strip()) <= hi:
            raise ValueError(f"{bad} must have {lo} to {hi} characters, got {value!r}")
        return value
    if kind is list:
        lo, hi = spec[1], spec[2]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() for v in value
        ):
            raise ValueError(f"{bad} must be a list of non-empty strings, got {value!r}")
        if not lo <= len(value) <= hi:
            raise ValueError(f"{bad} must have {lo} to {hi} items, got {value!r}")
        return list(value)
    if value not in spec:
        raise ValueError(f"{bad} must be one of {spec}, got {value!r}")
    return value


# --- vocabularies the samplers draw from ------------------------------------------------------
# They are pairwise disjoint and chosen so that every combination of compatible types stays
# satisfiable: no commas, no first-person pronouns, none of the RARE_LETTERS, none of the
# FORBIDDEN_POOL words, no all-capital words, and no FREQUENCY_POOL word inside another
# (tests/test_constraints.py checks these properties).

EXISTENCE_POOL = (
    "garden", "river", "morning", "bridge", "market", "window", "forest", "engine",
    "season", "island", "candle", "harvest",
)
FREQUENCY_POOL = ("energy", "balance", "history", "quality", "pattern", "network", "climate")
FORBIDDEN_POOL = (
    "very", "really", "basically", "actually", "just", "stuff", "thing", "literally", "nice",
)
FIRST_WORD_POOL = ("overall", "however", "finally", "moreover", "today", "meanwhile", "consider")
COMMON_LETTERS = ("e", "t", "a", "o", "i", "n", "s", "r")
RARE_LETTERS = ("z", "j", "x")  # letters a "less than" letter-frequency draw may limit
END_PHRASES = (  # all questions, so that ecd:question_at_end is compatible
    "Is there anything else you would like to know?",
    "Any other questions?",
    "Does that answer your question?",
    "What do you think?",
)
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITERS = ("Section", "SECTION")
SUMMARY_PREFIXES = ("Summary:", "In short:", "Bottom line:", "Key takeaway:")
START_PHRASES = ("Great question", "To begin with", "In brief", "Here is the answer")
LANGUAGES = (
    "en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta",
    "te", "bg", "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi",
)  # IFEval's LANGUAGE_CODES
LANGUAGE_NAMES = dict(zip(LANGUAGES, (
    "English", "Spanish", "Portuguese", "Arabic", "Hindi", "French", "Russian", "German",
    "Japanese", "Italian", "Bengali", "Ukrainian", "Thai", "Urdu", "Tamil", "Telugu",
    "Bulgarian", "Korean", "Polish", "Hebrew", "Persian", "Vietnamese", "Nepali", "Swahili",
    "Kannada", "Marathi", "Gujarati", "Punjabi", "Malayalam", "Finnish",
), strict=True))

# Not evolvable; sample() draws one of these so that it still returns valid kwargs.
EXAMPLE_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "Describe a good breakfast for a busy morning.",
)

# Sampling ranges (inclusive), per type: what ``sample`` draws. See the module docstring.
SAMPLING_RANGES: dict[str, str] = {
    "keywords:existence": "1-3 distinct words of EXISTENCE_POOL",
    "keywords:frequency": "a FREQUENCY_POOL word; 'at least' 2-4 or 'less than' 2-3",
    "keywords:forbidden_words": "2-3 distinct words of FORBIDDEN_POOL",
    "keywords:letter_frequency": "'at least' 3-10 of a COMMON_LETTERS letter, or 'less than' "
                                 "2-4 of a RARE_LETTERS letter",
    "language:response_language": "one of IFEval's 30 LANGUAGES (not evolvable)",
    "length_constraints:number_sentences": "'at least' 3-8 or 'less than' 8-15",
    "length_constraints:number_paragraphs": "2-5",
    "length_constraints:number_words": "'at least' 50/80/100 or 'less than' 200/250/300",
    "length_constraints:nth_paragraph_first_word": "num_paragraphs 2-4, nth_paragraph "
                                                   "1-num_paragraphs, a FIRST_WORD_POOL word",
    "detectable_content:number_placeholders": "1-3",
    "detectable_content:postscript": "P.S. or P.P.S",
    "detectable_format:number_bullet_lists": "2-5",
    "detectable_format:constrained_response": "(no kwargs; not evolvable)",
    "detectable_format:number_highlighted_sections": "1-3",
    "detectable_format:multiple_sections": "Section or SECTION; 2-4 sections",
    "detectable_format:json_format": "(no kwargs)",
    "detectable_format:title": "(no kwargs)",
    "combination:two_responses": "(no kwargs)",
    "combination:repeat_prompt": "one of EXAMPLE_PROMPTS (not evolvable: needs the prompt)",
    "startend:end_checker": "one of END_PHRASES",
    "change_case:capital_word_frequency": "'at least' 2-5 or 'less than' 8-12",
    "change_case:english_capital": "(no kwargs)",
    "change_case:english_lowercase": "(no kwargs)",
    "punctuation:no_comma": "(no kwargs)",
    "startend:quotation": "(no kwargs)",
    "ecd:word_count_range": "min_words 40-80 (step 10), max_words min_words + 100/150/200",
    "ecd:numbered_steps": "3-6",
    "ecd:markdown_table": "min_rows 2-4",
    "ecd:max_sentence_words": "20/25/30",
    "ecd:final_summary_line": "one of SUMMARY_PREFIXES",
    "ecd:starts_with": "one of START_PHRASES",
    "ecd:include_numbers": "1-3",
    "ecd:question_at_end": "(no kwargs)",
    "ecd:no_first_person": "(no kwargs)",
    "ecd:markdown_headings": "2-4",
    "ecd:max_paragraphs": "3-5",
    "ecd:include_examples": "1-2",
}

_N = 100_000  # upper bound of counts in the schemas (IFEval data stays far below)


def _no_kwargs(rng: random.Random) -> Kwargs:
    return {}


def _relation_sampler(count_name: str, relation_name: str, at_least: tuple[int, int],
                      less_than: tuple[int, int]) -> Callable[[random.Random], Kwargs]:
    def sample(rng: random.Random) -> Kwargs:
        relation = rng.choice(RELATIONS)
        lo, hi = at_least if relation == "at least" else less_than
        return {count_name: rng.randint(lo, hi), relation_name: relation}
    return sample


def _sample_frequency(rng: random.Random) -> Kwargs:
    relation = rng.choice(RELATIONS)
    frequency = rng.randint(2, 4) if relation == "at least" else rng.randint(2, 3)
    return {"keyword": rng.choice(FREQUENCY_POOL), "frequency": frequency, "relation": relation}


def _sample_letter(rng: random.Random) -> Kwargs:
    if rng.random() < 0.5:
        return {"letter": rng.choice(COMMON_LETTERS), "let_frequency": rng.randint(3, 10),
                "let_relation": "at least"}
    return {"letter": rng.choice(RARE_LETTERS), "let_frequency": rng.randint(2, 4),
            "let_relation": "less than"}


def _sample_number_words(rng: random.Random) -> Kwargs:
    if rng.random() < 0.5:
        return {"num_words": rng.choice((50, 80, 100)), "relation": "at least"}
    return {"num_words": rng.choice((200, 250, 300)), "relation": "less than"}


def _sample_nth_paragraph(rng: random.Random) -> Kwargs:
    num = rng.randint(2, 4)
    return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num),
            "first_word": rng.choice(FIRST_WORD_POOL)}


def _sample_word_range(rng: random.Random) -> Kwargs:
    lo = rng.randrange(40, 81, 10)
    return {"min_words": lo, "max_words": lo + rng.choice((100, 150, 200))}


def _min_le_max(kw: Kwargs) -> str | None:
    if kw["min_words"] > kw["max_words"]:
        return "kwarg 'min_words' must not exceed 'max_words'"
    return None


def _one_of(name: str, pool: tuple[str, ...]) -> Callable[[random.Random], Kwargs]:
    return lambda rng: {name: rng.choice(pool)}


def _count(name: str, lo: int, hi: int) -> Callable[[random.Random], Kwargs]:
    return lambda rng: {name: rng.randint(lo, hi)}


def _t(rid: str, sample: Callable[[random.Random], Kwargs], phrasings: tuple[str, ...],
       check: Callable[..., bool], schema: Mapping[str, ArgSpec] | None = None, *,
       is_format: bool = False, evolvable: bool = True,
       cross_check: Callable[[Kwargs], str | None] | None = None,
       display: Callable[[Kwargs], Kwargs] | None = None) -> RequirementType:
    return RequirementType(rid, sample, phrasings, check, is_format=is_format,
                           kwargs_schema=dict(schema or {}), evolvable=evolvable,
                           cross_check=cross_check, display=display)


_REL: ArgSpec = RELATIONS

_TYPES: list[RequirementType] = [
    # --- keywords ---
    _t("keywords:existence",
       lambda rng: {"keywords": sorted(rng.sample(EXISTENCE_POOL, rng.randint(1, 3)))},
       ("Include the keywords {keywords} in the response.",
        "Make sure your answer uses the words {keywords}.",
        "Work the following words into your answer: {keywords}."),
       ck.keywords_existence, {"keywords": (list, 1, 50)}),
    _t("keywords:frequency", _sample_frequency,
       ("In your response, the word \"{keyword}\" should appear {relation} {frequency} times.",
        "Use the word \"{keyword}\" {relation} {frequency} times in your answer.",
        "The word \"{keyword}\" must occur {relation} {frequency} times in what you write."),
       ck.keywords_frequency,
       {"keyword": (str, 1, 100), "frequency": (int, 0, _N), "relation": _REL}),
    _t("keywords:forbidden_words",
       lambda rng: {"forbidden_words": sorted(rng.sample(FORBIDDEN_POOL, rng.randint(2, 3)))},
       ("Do not include the words {forbidden_words} in the response.",
        "Avoid the words {forbidden_words} entirely.",
        "Your answer must not contain any of these words: {forbidden_words}."),
       ck.keywords_forbidden_words, {"forbidden_words": (list, 1, 50)}),
    _t("keywords:letter_frequency", _sample_letter,
       ("In your response, the letter \"{letter}\" should appear {let_relation} "
        "{let_frequency} times.",
        "Use the letter \"{letter}\" {let_relation} {let_frequency} times in your answer.",
        "Make sure the letter \"{letter}\" occurs {let_relation} {let_frequency} times in "
        "your response."),
       ck.keywords_letter_frequency,
       {"letter": (str, 1, 1), "let_frequency": (int, 0, _N), "let_relation": _REL}),
    # --- language ---
    _t("language:response_language", _one_of("language", LANGUAGES),
       ("Your ENTIRE response should be in {language_name} language, no other language is "
        "allowed.",
        "Answer only in {language_name}.",
        "Write the whole response in {language_name} (language code \"{language}\")."),
       ck.response_language, {"language": LANGUAGES}, evolvable=False,
       display=lambda kw: {"language_name": LANGUAGE_NAMES[kw["language"]]}),
    # --- length constraints ---
    _t("length_constraints:number_sentences",
       _relation_sampler("num_sentences", "relation", (3, 8), (8, 15)),
       ("Your response should contain {relation} {num_sentences} sentences.",
        "Write {relation} {num_sentences} sentences in total.",
        "Use {relation} {num_sentences} sentences in your answer."),
       ck.number_sentences, {"num_sentences": (int, 0, _N), "relation": _REL}),
    _t("length_constraints:number_paragraphs", _count("num_paragraphs", 2, 5),
       ("There should be {num_paragraphs} paragraphs. Paragraphs are separated with the "
        "markdown divider: ***",
        "Write exactly {num_paragraphs} paragraphs and separate them with a line containing "
        "only ***.",
        "Split your answer into {num_paragraphs} paragraphs divided by the markdown divider "
        "***."),
       ck.number_paragraphs, {"num_paragraphs": (int, 0, _N)}, is_format=True),
    _t("length_constraints:number_words", _sample_number_words,
       ("Answer with {relation} {num_words} words.",
        "Your response should contain {relation} {num_words} words.",
        "Keep the length of your answer to {relation} {num_words} words."),
       ck.number_words, {"num_words": (int, 0, _N), "relation": _REL}),
    _t("length_constraints:nth_paragraph_first_word", _sample_nth_paragraph,
       ("There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are "
        "separated with each other by two new lines. Paragraph {nth_paragraph} must start "
        "with the word \"{first_word}\".",
        "Write exactly {num_paragraphs} paragraphs separated by blank lines, and begin "
        "paragraph number {nth_paragraph} with the word \"{first_word}\".",
        "Use {num_paragraphs} paragraphs (separated by an empty line); the first word of "
        "paragraph {nth_paragraph} has to be \"{first_word}\"."),
       ck.nth_paragraph_first_word,
       {"num_paragraphs": (int, 0, _N), "nth_paragraph": (int, 1, _N),
        "first_word": (str, 1, 100)}, is_format=True),
    # --- detectable content ---
    _t("detectable_content:number_placeholders", _count("num_placeholders", 1, 3),
       ("The response must contain at least {num_placeholders} placeholders represented by "
        "square brackets, such as [address].",
        "Include at least {num_placeholders} fill-in placeholders in square brackets, like "
        "[name].",
        "Leave at least {num_placeholders} placeholders in square brackets (for instance "
        "[date]) for the reader to fill in."),
       ck.number_placeholders, {"num_placeholders": (int, 0, _N)}),
    _t("detectable_content:postscript", _one_of("postscript_marker", POSTSCRIPT_MARKERS),
       ("At the end of your response, please explicitly add a postscript starting with "
        "{postscript_marker}",
        "Finish with a postscript that begins with \"{postscript_marker}\".",
        "Add a short postscript at the end, introduced by {postscript_marker}"),
       ck.postscript, {"postscript_marker": (str, 1, 20)}),
    # --- detectable format ---
    _t("detectable_format:number_bullet_lists", _count("num_bullets", 2, 5),
       ("Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet "
        "points such as:\n* This is point 1.\n* This is point 2",
        "Format the answer as exactly {num_bullets} markdown bullet points (* item).",
        "Present your answer as a list of exactly {num_bullets} bullet points, each line "
        "starting with \"* \"."),
       ck.number_bullet_lists, {"num_bullets": (int, 0, _N)}, is_format=True),
    _t("detectable_format:constrained_response", _no_kwargs,
       ("Answer with one of the following options: (\"My answer is yes.\", \"My answer is "
        "no.\", \"My answer is maybe.\")",
        "Reply only with \"My answer is yes.\", \"My answer is no.\" or \"My answer is "
        "maybe.\"",
        "Your answer must be exactly one of: My answer is yes. / My answer is no. / My "
        "answer is maybe."),
       ck.constrained_response, is_format=True, evolvable=False),
    _t("detectable_format:number_highlighted_sections", _count("num_highlights", 1, 3),
       ("Highlight at least {num_highlights} sections in your answer with markdown, i.e. "
        "*highlighted section*.",
        "Mark at least {num_highlights} key parts of your answer as *highlighted text* using "
        "markdown asterisks.",
        "Use markdown italics to highlight at least {num_highlights} sections, like "
        "*this part*."),
       ck.number_highlighted_sections, {"num_highlights": (int, 0, _N)}, is_format=True),
    _t("detectable_format:multiple_sections",
       lambda rng: {"section_spliter": rng.choice(SECTION_SPLITERS),
                    "num_sections": rng.randint(2, 4)},
       ("Your response must have {num_sections} sections. Mark the beginning of each section "
        "with {section_spliter} X, such as:\n{section_spliter} 1\n[content of section 1]\n"
        "{section_spliter} 2\n[content of section 2]",
        "Organize the answer into {num_sections} sections, each starting with a line "
        "\"{section_spliter} N\" where N is the section number.",
        "Split your response into {num_sections} numbered sections headed \"{section_spliter} "
        "1\", \"{section_spliter} 2\" and so on."),
       ck.multiple_sections,
       {"section_spliter": (str, 1, 50), "num_sections": (int, 0, _N)}, is_format=True),
    _t("detectable_format:json_format", _no_kwargs,
       ("Entire output should be wrapped in JSON format. You can use markdown ticks such as "
        "```.",
        "Your whole answer must be valid JSON.",
        "Reply with a single JSON object and nothing else (a ```json code fence is fine)."),
       ck.json_format, is_format=True),
    _t("detectable_format:title", _no_kwargs,
       ("Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Give your answer a title in double angular brackets, like <<my title>>.",
        "Include a title written as <<title>> (double angular brackets)."),
       ck.title, is_format=True),
    # --- combination ---
    _t("combination:two_responses", _no_kwargs,
       ("Give two different responses. Responses and only responses should be separated by "
        "6 asterisk symbols: ******.",
        "Write two distinct answers separated by a line of six asterisks (******).",
        "Provide two alternative responses; put ****** between them and nowhere else."),
       ck.two_responses),
    _t("combination:repeat_prompt", _one_of("prompt_to_repeat", EXAMPLE_PROMPTS),
       ("First repeat the request word for word without change, then give your answer (1. do "
        "not say any words or characters before repeating the request; 2. the request you "
        "need to repeat does not include this sentence)",
        "Begin by repeating the request exactly as given (without this sentence), then "
        "answer it."),
       ck.repeat_prompt, {"prompt_to_repeat": (str, 1, _N)}, evolvable=False),
    # --- start / end ---
    _t("startend:end_checker", _one_of("end_phrase", END_PHRASES),
       ("Finish your response with this exact phrase: {end_phrase} No other words should "
        "follow this phrase.",
        "End your answer with the exact phrase \"{end_phrase}\"",
        "The very last words of your response must be: {end_phrase}"),
       ck.end_checker, {"end_phrase": (str, 1, 500)}),
    _t("startend:quotation", _no_kwargs,
       ("Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotes (\").",
        "Enclose the entire response in a pair of double quotation marks."),
       ck.quotation, is_format=True),
    # --- change case ---
    _t("change_case:capital_word_frequency",
       _relation_sampler("capital_frequency", "capital_relation", (2, 5), (8, 12)),
       ("In your response, words with all capital letters should appear {capital_relation} "
        "{capital_frequency} times.",
        "Use {capital_relation} {capital_frequency} words written entirely in CAPITAL "
        "letters.",
        "Write {capital_relation} {capital_frequency} words in all capitals in your answer."),
       ck.capital_word_frequency,
       {"capital_frequency": (int, 0, _N), "capital_relation": _REL}),
    _t("change_case:english_capital", _no_kwargs,
       ("Your entire response should be in English, and in all capital letters.",
        "Write your whole answer in English using only CAPITAL LETTERS.",
        "Respond in English, entirely in uppercase."),
       ck.english_capital),
    _t("change_case:english_lowercase", _no_kwargs,
       ("Your entire response should be in English, and in all lowercase letters. No capital "
        "letters are allowed.",
        "Write everything in English and in lowercase, with no capital letters.",
        "Use only lowercase letters in your English response; no capitals at all."),
       ck.english_lowercase),
    # --- punctuation ---
    _t("punctuation:no_comma", _no_kwargs,
       ("In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your response.",
        "Write your whole answer without a single comma."),
       ck.no_comma),
    # --- the project's own ---
    _t("ecd:word_count_range", _sample_word_range,
       ("Your answer should be between {min_words} and {max_words} words long.",
        "Use at least {min_words} and at most {max_words} words.",
        "Keep the response within {min_words} to {max_words} words."),
       ck.word_count_range, {"min_words": (int, 1, _N), "max_words": (int, 1, _N)},
       cross_check=_min_le_max),
    _t("ecd:numbered_steps", _count("num_steps", 3, 6),
       ("Present your answer as exactly {num_steps} numbered steps (1., 2., ...), one per "
        "line.",
        "Structure the answer as a numbered list of exactly {num_steps} steps, each line "
        "starting with its number, like \"1.\".",
        "Break your answer into {num_steps} numbered steps, written as lines beginning with "
        "1., 2., and so on."),
       ck.numbered_steps, {"num_steps": (int, 1, 1000)}, is_format=True),
    _t("ecd:markdown_table", _count("min_rows", 2, 4),
       ("Include a markdown table with a header row and at least {min_rows} data rows.",
        "Summarize the key information in a markdown table (| col | col |) with at least "
        "{min_rows} rows below the header.",
        "Add a table in markdown format that has a header and {min_rows} or more rows."),
       ck.markdown_table, {"min_rows": (int, 1, 1000)}, is_format=True),
    _t("ecd:max_sentence_words", _one_of("max_words", (20, 25, 30)),
       ("Keep every sentence at most {max_words} words long.",
        "No sentence in your answer may be longer than {max_words} words.",
        "Write short sentences: none of them should exceed {max_words} words."),
       ck.max_sentence_words, {"max_words": (int, 1, _N)}),
    _t("ecd:final_summary_line", _one_of("prefix", SUMMARY_PREFIXES),
       ("End with a one-line summary that starts with \"{prefix}\"",
        "The last line of your response must begin with \"{prefix}\" and sum up the answer.",
        "Close your answer with a final line of the form \"{prefix} ...\" summarizing it."),
       ck.final_summary_line, {"prefix": (str, 1, 50)}, is_format=True),
    _t("ecd:starts_with", _one_of("phrase", START_PHRASES),
       ("Begin your response with the phrase \"{phrase}\".",
        "Your answer must start with the words \"{phrase}\".",
        "Open your response with \"{phrase}\" and nothing before it."),
       ck.starts_with, {"phrase": (str, 1, 200)}),
    _t("ecd:include_numbers", _count("num_numbers", 1, 3),
       ("Include at least {num_numbers} specific numbers written in digits.",
        "Support your answer with at least {num_numbers} concrete figures, written as digits "
        "(such as 12 or 3.5).",
        "Mention at least {num_numbers} numeric values in digits."),
       ck.include_numbers, {"num_numbers": (int, 1, 1000)}),
    _t("ecd:question_at_end", _no_kwargs,
       ("End your response with a question for the reader.",
        "Finish with a question, so that the last character of your answer is a question "
        "mark.",
        "Close your answer by asking the reader a follow-up question."),
       ck.question_at_end),
    _t("ecd:no_first_person", _no_kwargs,
       ("Do not use first-person pronouns (I, me, my, we, us, our) anywhere in your answer.",
        "Write without referring to yourself: no \"I\", \"me\", \"my\", \"we\", \"us\" or "
        "\"our\".",
        "Keep the response impersonal, avoiding first-person words such as I, my and we."),
       ck.no_first_person),
    _t("ecd:markdown_headings", _count("num_headings", 2, 4),
       ("Organize your answer under at least {num_headings} markdown headings (lines "
        "starting with #).",
        "Use at least {num_headings} markdown headings such as \"## Overview\".",
        "Structure the response with {num_headings} or more headings written in markdown "
        "(#, ## or ###)."),
       ck.markdown_headings, {"num_headings": (int, 1, 1000)}, is_format=True),
    _t("ecd:max_paragraphs", _count("max_paragraphs", 3, 5),
       ("Use at most {max_paragraphs} paragraphs (separated by blank lines).",
        "Keep your answer to no more than {max_paragraphs} paragraphs.",
        "Your response must not have more than {max_paragraphs} blank-line-separated "
        "paragraphs."),
       ck.max_paragraphs, {"max_paragraphs": (int, 1, _N)}),
    _t("ecd:include_examples", _count("num_examples", 1, 2),
       ("Give at least {num_examples} concrete example(s), each introduced by \"for example\" "
        "or \"for instance\".",
        "Illustrate your answer with at least {num_examples} example(s), starting each with "
        "\"For instance\" or \"For example\".",
        "Include {num_examples} or more examples introduced by \"for example\", \"for "
        "instance\" or \"e.g.\"."),
       ck.include_examples, {"num_examples": (int, 1, 100)}),
]

# --- conflicts ---------------------------------------------------------------------------------
# Pairs of types that cannot both hold, or whose instructions contradict each other.
_CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    # IFEval's INSTRUCTION_CONFLICTS (instructions_registry.py)
    ("language:response_language", "detectable_format:multiple_sections"),
    ("language:response_language", "keywords:existence"),
    ("language:response_language", "keywords:frequency"),
    ("language:response_language", "keywords:forbidden_words"),
    ("language:response_language", "startend:end_checker"),
    ("language:response_language", "change_case:english_capital"),
    ("language:response_language", "change_case:english_lowercase"),
    ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
    ("length_constraints:number_paragraphs", "length_constraints:number_sentences"),
    ("detectable_format:multiple_sections", "detectable_format:number_highlighted_sections"),
    ("change_case:capital_word_frequency", "change_case:english_lowercase"),
    ("change_case:capital_word_frequency", "change_case:english_capital"),
    ("change_case:english_lowercase", "change_case:english_capital"),
    ("startend:quotation", "detectable_format:title"),
    # section splitters are "Section"/"SECTION": neither is all lowercase, one is not capitals
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),
    ("detectable_format:multiple_sections", "change_case:english_capital"),
    # English-specific words, pronouns, punctuation or letters under another language
    ("language:response_language", "keywords:letter_frequency"),
    ("language:response_language", "change_case:capital_word_frequency"),
    ("language:response_language", "ecd:starts_with"),
    ("language:response_language", "ecd:final_summary_line"),
    ("language:response_language", "ecd:no_first_person"),
    ("language:response_language", "ecd:include_examples"),
    ("language:response_language", "ecd:question_at_end"),
    # two ways of counting words or paragraphs
    ("length_constraints:number_words", "ecd:word_count_range"),
    ("ecd:max_paragraphs", "length_constraints:number_paragraphs"),
    ("ecd:max_paragraphs", "length_constraints:nth_paragraph_first_word"),
    # two list formats for the whole answer
    ("detectable_format:number_bullet_lists", "ecd:numbered_steps"),
    # the first paragraph cannot start with both the phrase and the first word (nth = 1);
    # a quoted response starts with '"'
    ("ecd:starts_with", "length_constraints:nth_paragraph_first_word"),
    ("ecd:starts_with", "startend:quotation"),
    # the end of the response is claimed by both
    ("ecd:final_summary_line", "startend:end_checker"),
    ("ecd:final_summary_line", "detectable_content:postscript"),
    ("ecd:final_summary_line", "ecd:question_at_end"),
)

# Types that conflict with every type except the listed ones.
_EXCLUSIVE: dict[str, frozenset[str]] = {
    "detectable_format:constrained_response": frozenset(),
    "detectable_format:json_format": frozenset({
        "keywords:existence", "keywords:forbidden_words", "ecd:include_numbers",
        "ecd:no_first_person",
    }),
    "combination:two_responses": frozenset({
        "keywords:existence", "keywords:forbidden_words", "language:response_language",
        "detectable_format:title", "punctuation:no_comma", "ecd:include_numbers",
        "ecd:no_first_person", "ecd:max_sentence_words", "ecd:include_examples",
    }),
    "combination:repeat_prompt": frozenset({
        "keywords:existence", "detectable_format:title", "punctuation:no_comma",
        "ecd:include_numbers",
    }),
}


def _conflict_sets(ids: list[str]) -> dict[str, set[str]]:
    sets: dict[str, set[str]] = {i: {i} for i in ids}
    pairs = list(_CONFLICT_PAIRS)
    for rid, allowed in _EXCLUSIVE.items():
        pairs += [(rid, other) for other in ids if other != rid and other not in allowed]
    for a, b in pairs:
        if a not in sets or b not in sets:
            raise KeyError(f"conflict pair names an unknown requirement type: {(a, b)}")
        sets[a].add(b)
        sets[b].add(a)
    return sets


def _build(types: list[RequirementType]) -> dict[str, RequirementType]:
    ids = [t.id for t in types]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate requirement type ids")
    sets = _conflict_sets(ids)
    return {t.id: replace(t, conflicts=frozenset(sets[t.id])) for t in types}


CATALOGUE: dict[str, RequirementType] = _build(_TYPES)

IFEVAL_IDS: tuple[str, ...] = tuple(i for i in CATALOGUE if not i.startswith("ecd:"))


def conflicts(a: str, b: str) -> bool:
    """Whether requirement types ``a`` and ``b`` cannot both hold (symmetric)."""
    return a == b or b in CATALOGUE[a].conflicts or a in CATALOGUE[b].conflicts


def compatible_types(present: list[str], *, formats_only: bool = False) -> list[str]:
    """Evolvable catalogue ids that conflict with none of ``present``, in catalogue order."""
    return [
        t.id
        for t in CATALOGUE.values()
        if t.evolvable and (t.is_format or not formats_only)
        and not any(conflicts(t.id, p) for p in present)
    ]


def _requirement(req_id: str) -> RequirementType:
    try:
        return CATALOGUE[req_id]
    except KeyError:
        raise KeyError(f"unknown requirement type {req_id!r}; known ids: "
                       f"{', '.join(sorted(CATALOGUE))}") from None


def check_strict(req_id: str, response: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """IFEval's strict check: the response is non-empty and follows requirement ``req_id``.

    ``kwargs`` may carry None for unused keys (as IFEval JSONL rows do); those are dropped.
    Raises KeyError for an unknown id and ValueError for invalid kwargs.
    """
    rtype = _requirement(req_id)
    kw = rtype.validate_kwargs(kwargs or {})
    return bool(response.strip()) and bool(rtype.check(response, **kw))


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-check variants: the response, without its first line, without its last
    line and without both, each also with every ``*`` removed; empty ones left out."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    variants = [response, response.replace("*", "")]
    variants += cut + [c.replace("*", "") for c in cut]
    return [v for v in variants if v.strip()]


def check_loose(req_id: str, response: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """IFEval's loose check: any of :func:`loose_variants` follows requirement ``req_id``."""
    rtype = _requirement(req_id)
    kw = rtype.validate_kwargs(kwargs or {})
    return any(rtype.check(v, **kw) for v in loose_variants(response))
