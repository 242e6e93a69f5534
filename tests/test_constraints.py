"""The requirement catalogue: checkers (strict and loose), kwargs, phrasings and conflicts."""

from __future__ import annotations

import inspect
import json
import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ecd_ray.constraints import (
    CATALOGUE,
    IFEVAL_IDS,
    STATED_CHECKS,
    RequirementType,
    check_loose,
    check_strict,
    compatible_types,
    conflicts,
    stated,
)
from ecd_ray.constraints import catalogue as cat
from ecd_ray.constraints import checkers as ck
from ecd_ray.constraints.stated import numbers as st_numbers

IFEVAL_25 = {
    "keywords:existence": ["keywords"],
    "keywords:frequency": ["keyword", "frequency", "relation"],
    "keywords:forbidden_words": ["forbidden_words"],
    "keywords:letter_frequency": ["letter", "let_frequency", "let_relation"],
    "language:response_language": ["language"],
    "length_constraints:number_sentences": ["num_sentences", "relation"],
    "length_constraints:number_paragraphs": ["num_paragraphs"],
    "length_constraints:number_words": ["num_words", "relation"],
    "length_constraints:nth_paragraph_first_word": ["num_paragraphs", "nth_paragraph",
                                                    "first_word"],
    "detectable_content:number_placeholders": ["num_placeholders"],
    "detectable_content:postscript": ["postscript_marker"],
    "detectable_format:number_bullet_lists": ["num_bullets"],
    "detectable_format:constrained_response": [],
    "detectable_format:number_highlighted_sections": ["num_highlights"],
    "detectable_format:multiple_sections": ["section_spliter", "num_sections"],
    "detectable_format:json_format": [],
    "detectable_format:title": [],
    "combination:two_responses": [],
    "combination:repeat_prompt": ["prompt_to_repeat"],
    "startend:end_checker": ["end_phrase"],
    "change_case:capital_word_frequency": ["capital_frequency", "capital_relation"],
    "change_case:english_capital": [],
    "change_case:english_lowercase": [],
    "punctuation:no_comma": [],
    "startend:quotation": [],
}

# --- the catalogue ---------------------------------------------------------------------------


def test_all_ifeval_types_under_their_ids_and_kwargs_names() -> None:
    assert set(IFEVAL_25) <= set(CATALOGUE)
    assert set(IFEVAL_IDS) == set(IFEVAL_25)
    for rid, names in IFEVAL_25.items():
        assert sorted(CATALOGUE[rid].kwargs_schema) == sorted(names), rid


def test_own_types_and_phrasings() -> None:
    own = [i for i in CATALOGUE if i.startswith("ecd:")]
    assert len(own) >= 10
    assert set(CATALOGUE) == set(IFEVAL_25) | set(own)
    for t in CATALOGUE.values():
        assert len(t.phrasings) >= 2, t.id
        assert len(set(t.phrasings)) == len(t.phrasings), t.id
        assert isinstance(t, RequirementType) and t.id


@pytest.mark.parametrize("rid", sorted(CATALOGUE))
def test_schema_matches_the_checker_signature(rid: str) -> None:
    t = CATALOGUE[rid]
    params = list(inspect.signature(t.check).parameters)
    assert params[0] == "response"
    assert sorted(params[1:]) == sorted(t.kwargs_schema)
    assert rid in cat.SAMPLING_RANGES


def test_non_evolvable_types_are_never_offered() -> None:
    frozen = {i for i, t in CATALOGUE.items() if not t.evolvable}
    assert frozen == {"combination:repeat_prompt", "language:response_language",
                      "detectable_format:constrained_response"}
    assert not frozen & set(compatible_types([]))
    formats = compatible_types([], formats_only=True)
    assert formats and all(CATALOGUE[i].is_format for i in formats)


# --- hand-written cases: at least two passing and two failing responses per type -----------

KW_FREQ = {"keyword": "energy", "frequency": 3, "relation": "at least"}
KW_FREQ_LT = {"keyword": "energy", "frequency": 2, "relation": "less than"}
LETTER_E = {"letter": "e", "let_frequency": 3, "let_relation": "at least"}
LETTER_Z = {"letter": "z", "let_frequency": 2, "let_relation": "less than"}
NTH = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}
SECTIONS = {"section_spliter": "Section", "num_sections": 2}
TABLE = "| plant | need |\n|---|---|\n| rose | sun |\n| fern | shade |"
LOWER_EN = "this is all lowercase english text about gardens and the rivers near them."
UPPER_EN = "THIS IS ALL CAPITAL ENGLISH TEXT ABOUT GARDENS AND THE RIVERS NEAR THEM."

CASES: list[tuple[str, dict, str, bool]] = [
    # keywords:existence
    ("keywords:existence", {"keywords": ["garden", "river"]}, "The Garden sits by the RIVER.",
     True),
    ("keywords:existence", {"keywords": ["garden", "river"]}, "Gardens line the riverbank 🌊",
     True),
    ("keywords:existence", {"keywords": ["garden", "river"]}, "The garden is quiet.", False),
    ("keywords:existence", {"keywords": ["garden", "river"]}, "", False),
    ("keywords:existence", {"keywords": ["café"]}, "Un CAFÉ, s'il vous plaît.", True),
    # keywords:frequency
    ("keywords:frequency", KW_FREQ, "Energy, energy and more ENERGY.", True),
    ("keywords:frequency", KW_FREQ, "energy energy bioenergy", True),
    ("keywords:frequency", KW_FREQ, "energy twice: energy.", False),
    ("keywords:frequency", KW_FREQ, "Énergie is the French word.", False),
    ("keywords:frequency", KW_FREQ_LT, "No mention at all.", True),
    ("keywords:frequency", KW_FREQ_LT, "energy once  \n", True),
    ("keywords:frequency", KW_FREQ_LT, "energy and *energy*", False),
    # keywords:forbidden_words
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]}, "This is truly good.",
     True),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]},
     "Justice and everything are fine.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]}, "It is Very good.",
     False),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]}, "**just** kidding\n",
     False),
    # keywords:letter_frequency
    ("keywords:letter_frequency", LETTER_E, "EEe", True),
    ("keywords:letter_frequency", LETTER_E, "Tree seed", True),
    ("keywords:letter_frequency", LETTER_E, "café au lait", False),  # é is not e
    ("keywords:letter_frequency", LETTER_E, "eye", False),
    ("keywords:letter_frequency", LETTER_Z, "Zero is fine.", True),
    ("keywords:letter_frequency", LETTER_Z, "buzz", False),
    # language:response_language
    ("language:response_language", {"language": "fr"},
     "Bonjour, je suis très content de vous voir aujourd'hui.", True),
    ("language:response_language", {"language": "fr"}, "12345 !!! 🎉", True),  # undetectable
    ("language:response_language", {"language": "ja"}, "庭には水と日光が必要です。", True),
    ("language:response_language", {"language": "fr"},
     "Hello, I am very happy to see you today in the garden.", False),
    ("language:response_language", {"language": "fr"}, "   \n", False),
    # length_constraints:number_sentences
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One sentence. Two sentences.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith arrived at 3.5 p.m. sharp. He left, e.g. by car.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two. Three.", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Wow! Really?! Yes…", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "First point.\n\n1. Step one\n2. Step two\nDone!", True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "**Only one.**", False),
    # length_constraints:number_paragraphs
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB\n***\nC", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "***\nCafé.\n***\nNaïve.\n***\nDéjà.\n***\n", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "A\n***\n\n***\nB\n***\nC", False),  # an empty paragraph in the middle
    # length_constraints:number_words
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "café naïve résumé", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "one two three four   ", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two",
     False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "😀 🎉 ✨ ok", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "hi there",
     True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"},
     "don't stop", False),  # don't is two words, as in IFEval
    # length_constraints:nth_paragraph_first_word
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro text.\n\nHowever, it works.",
     True),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\n\"However\" it works.\n",
     True),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\nMoreover, no.", False),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\nHowever.\n\nThird.",
     False),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\nHowever, one paragraph.",
     False),
    # detectable_content:number_placeholders
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [place].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[café][naïve]", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "No brackets (here) {or here}.", False),
    # detectable_content:postscript
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks.\nP.S. See you!",
     True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "thanks\np. s. lowercase works", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks.\nPS see you",
     False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "P.P.S only that", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.P.S extra",
     True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.S. one", False),
    # detectable_format:number_bullet_lists
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Intro\n- café\n  - naïve\n", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three",
     False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**bold** line\n* one",
     False),
    # detectable_format:constrained_response
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "After thinking: My answer is maybe.  ",
     True),
    ("detectable_format:constrained_response", {}, "My answer is Yes.", False),
    ("detectable_format:constrained_response", {}, "yes", False),
    # detectable_format:number_highlighted_sections
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "**café** and *naïve*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* only",
     False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "** ** and *\n* and **", False),  # empty highlights and spans across lines
    # detectable_format:multiple_sections
    ("detectable_format:multiple_sections", SECTIONS, "Section 1\nA\nSection 2\nB", True),
    ("detectable_format:multiple_sections", SECTIONS,
     "Intro\nSection 1 A Section 2 B Section 3 C", True),
    ("detectable_format:multiple_sections", SECTIONS, "SECTION 1\nA\nSECTION 2\nB", False),
    ("detectable_format:multiple_sections", SECTIONS, "Section 1 only", False),
    # detectable_format:json_format
    ("detectable_format:json_format", {}, '{"a": 1, "café": "naïve 😀"}', True),
    ("detectable_format:json_format", {}, "```json\n[1, 2]\n```\n", True),
    ("detectable_format:json_format", {}, 'Here: {"a": 1}', False),
    ("detectable_format:json_format", {}, "{'a': 1}", False),
    # detectable_format:title
    ("detectable_format:title", {}, "<<Poem of Joy>>\ntext", True),
    ("detectable_format:title", {}, "text <<café ☕>>", True),
    ("detectable_format:title", {}, "<< >> is an empty title", False),
    ("detectable_format:title", {}, "<<>>", False),
    ("detectable_format:title", {}, "<<multi\nline>>", False),
    # combination:two_responses
    ("combination:two_responses", {}, "A\n******\nB", True),
    ("combination:two_responses", {}, "******\nCafé\n******\nNaïve\n", True),
    ("combination:two_responses", {}, "A\n******\n  A  ", False),
    ("combination:two_responses", {}, "A\n******\n******\nB", False),
    ("combination:two_responses", {}, "Only one answer.", False),
    # combination:repeat_prompt
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a poem. Here it is.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "  Write a poem.\nRoses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "Sure! Write a poem.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Write a poem",
     False),
    # startend:end_checker
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"Done. ANY OTHER QUESTIONS?"\n  ', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Any other questions? Bye.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. **Any other questions?**", False),
    # startend:quotation
    ("startend:quotation", {}, '"Hello"', True),
    ("startend:quotation", {}, '  "café\nnaïve"\n', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, "'single quotes'", False),
    ("startend:quotation", {}, "“curly quotes”", False),
    # change_case:capital_word_frequency
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "at least"}, "NASA and the USA", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "at least"}, "COVID-19 is NOT over", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "at least"}, "Only NASA here", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "at least"}, "Naïve CAFÉ", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "less than"}, "I am here.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation":
                                            "less than"}, "I AM here.", False),
    # change_case:english_capital
    ("change_case:english_capital", {}, UPPER_EN, True),
    ("change_case:english_capital", {},
     "EVERY MORNING THE CHILDREN WALK TO SCHOOL, THEN THEY TALK ABOUT CLASS.  \n", True),
    ("change_case:english_capital", {}, "This is mixed case English text.", False),
    ("change_case:english_capital", {},
     "BONJOUR, JE SUIS TRÈS CONTENT DE VOUS VOIR AUJOURD'HUI.", False),
    ("change_case:english_capital", {}, "123 !!!", False),  # no cased letter
    # change_case:english_lowercase
    ("change_case:english_lowercase", {}, LOWER_EN, True),
    ("change_case:english_lowercase", {}, "- the first point about water\n- the second point "
     "about the soil in the garden\n", True),
    ("change_case:english_lowercase", {}, "This has a Capital letter in the garden.", False),
    ("change_case:english_lowercase", {}, "je suis très content de vous voir aujourd'hui.",
     False),
    # punctuation:no_comma
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "A full-width comma，is not the ASCII one", True),
    ("punctuation:no_comma", {}, "a, b", False),
    ("punctuation:no_comma", {}, "It costs 1,000 dollars.\n", False),
    # ecd:word_count_range
    ("ecd:word_count_range", {"min_words": 2, "max_words": 4}, "one two", True),
    ("ecd:word_count_range", {"min_words": 2, "max_words": 4}, "café naïve résumé déjà", True),
    ("ecd:word_count_range", {"min_words": 2, "max_words": 4}, "one 😀", False),
    ("ecd:word_count_range", {"min_words": 2, "max_words": 4}, "one two three four five",
     False),
    # ecd:numbered_steps
    ("ecd:numbered_steps", {"num_steps": 3}, "1. a\n2. b\n3. c", True),
    ("ecd:numbered_steps", {"num_steps": 3}, "Intro:\n1) café\n 2) naïve\n3) déjà\nDone.", True),
    ("ecd:numbered_steps", {"num_steps": 3}, "1. a\n2. b", False),
    ("ecd:numbered_steps", {"num_steps": 3}, "1. a\n3. b\n2. c", False),
    ("ecd:numbered_steps", {"num_steps": 3}, "1. a\n2. b\n3. c\n4. d", False),
    # ecd:markdown_table
    ("ecd:markdown_table", {"min_rows": 2}, TABLE, True),
    ("ecd:markdown_table", {"min_rows": 2}, "Intro\na | b\n:-- | --:\ncafé | 2\nnaïve | 4\n",
     True),
    ("ecd:markdown_table", {"min_rows": 2}, "| a | b |\n| 1 | 2 |\n| 3 | 4 |", False),
    ("ecd:markdown_table", {"min_rows": 2}, "| a | b |\n|---|---|\n| 1 | 2 |", False),
    ("ecd:markdown_table", {"min_rows": 2}, "| a |\n|---|\n| 1 |\n| 2 |", False),  # 1 column
    # ecd:max_sentence_words
    ("ecd:max_sentence_words", {"max_words": 5}, "Short one. Another short one!", True),
    ("ecd:max_sentence_words", {"max_words": 5}, "* item one two three\n* item four five six",
     True),
    ("ecd:max_sentence_words", {"max_words": 5},
     "This sentence has far too many words in it.", False),
    ("ecd:max_sentence_words", {"max_words": 5}, "Ok. café naïve un deux trois quatre", False),
    # ecd:final_summary_line
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "Text.\nSummary: it works.\n\n", True),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "text\n  SUMMARY: done ✅", True),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "Summary: first\nmore text", False),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "Text.\nSummary:  ", False),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "Text.\n**Summary:** bold", False),
    # ecd:starts_with
    ("ecd:starts_with", {"phrase": "In brief"}, "In brief, yes.", True),
    ("ecd:starts_with", {"phrase": "In brief"}, "  \n in BRIEF: yes", True),
    ("ecd:starts_with", {"phrase": "In brief"}, "Briefly, yes.", False),
    ("ecd:starts_with", {"phrase": "In brief"}, "In briefcase terms", False),
    ("ecd:starts_with", {"phrase": "In brief"}, "\"In brief\" quoted", False),
    # ecd:include_numbers
    ("ecd:include_numbers", {"num_numbers": 2}, "It costs 3.50 and weighs 1,000 kg.", True),
    ("ecd:include_numbers", {"num_numbers": 2}, "Between 1990 and 2000.", True),
    ("ecd:include_numbers", {"num_numbers": 2}, "1. Only a list marker\n2. And another",
     False),
    ("ecd:include_numbers", {"num_numbers": 2}, "Only 7 here.", False),
    # ecd:question_at_end
    ("ecd:question_at_end", {}, "Ready?", True),
    ("ecd:question_at_end", {}, '"Do you agree?"', True),
    ("ecd:question_at_end", {}, "What now?**  \n", True),
    ("ecd:question_at_end", {}, "Done.", False),
    ("ecd:question_at_end", {}, "Why? Because.", False),
    # ecd:no_first_person
    ("ecd:no_first_person", {}, "The plan works well.", True),
    ("ecd:no_first_person", {}, "See the menu at the museum, i.e. the café.", True),
    ("ecd:no_first_person", {}, "I think so.", False),
    ("ecd:no_first_person", {}, "Let us go.", False),
    ("ecd:no_first_person", {}, "We're done", False),
    ("ecd:no_first_person", {}, "OUR plan", False),
    # ecd:markdown_headings
    ("ecd:markdown_headings", {"num_headings": 2}, "# A\ntext\n## B", True),
    ("ecd:markdown_headings", {"num_headings": 2}, "### Café\n#### Naïve\n", True),
    ("ecd:markdown_headings", {"num_headings": 2}, "#A\n#B", False),
    ("ecd:markdown_headings", {"num_headings": 2}, "    # indented code\n# B", False),
    # ecd:max_paragraphs
    ("ecd:max_paragraphs", {"max_paragraphs": 2}, "A\n\nB", True),
    ("ecd:max_paragraphs", {"max_paragraphs": 2}, "A\nstill A\n\n\n  \nB\n", True),
    ("ecd:max_paragraphs", {"max_paragraphs": 2}, "A\n\nB\n\nC", False),
    ("ecd:max_paragraphs", {"max_paragraphs": 2}, "A\n \nB\n\t\nC", False),
    # ecd:include_examples
    ("ecd:include_examples", {"num_examples": 2}, "For example, x. For instance, y.", True),
    ("ecd:include_examples", {"num_examples": 2}, "e.g. apples, E.G. pears", True),
    ("ecd:include_examples", {"num_examples": 2}, "For example only once.", False),
    ("ecd:include_examples", {"num_examples": 2}, "Examples abound, for instances.", False),
]


@pytest.mark.parametrize(("rid", "kwargs", "response", "expected"), CASES)
def test_hand_written_cases(rid: str, kwargs: dict, response: str, expected: bool) -> None:
    assert check_strict(rid, response, kwargs) is expected


def test_every_type_has_two_passing_and_two_failing_cases() -> None:
    for rid in CATALOGUE:
        outcomes = [exp for r, _, _, exp in CASES if r == rid]
        assert outcomes.count(True) >= 2 and outcomes.count(False) >= 2, rid


@pytest.mark.parametrize("rid", sorted(CATALOGUE))
@pytest.mark.parametrize("response", ["", "   ", "\n\n\t"])
def test_empty_response_fails_strict_and_loose(rid: str, response: str) -> None:
    kwargs = CATALOGUE[rid].sample(random.Random(0))
    assert check_strict(rid, response, kwargs) is False
    assert check_loose(rid, response, kwargs) is False


# --- strict vs loose ---------------------------------------------------------------------------

LOOSE_ONLY: list[tuple[str, dict, str]] = [
    ("detectable_format:json_format", {}, 'Sure, here it is:\n{"answer": 42}'),
    ("detectable_format:json_format", {}, '{"answer": 42}\nHope this helps!'),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done.\n**Any other questions?**"),
    ("length_constraints:nth_paragraph_first_word", NTH, "Intro.\n\n**However**, it works."),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, "Text.\n**Summary:** it works."),
    ("startend:quotation", {}, 'Sure:\n"the whole answer"'),
    ("ecd:starts_with", {"phrase": "In brief"}, "Sure!\nIn brief, yes."),
    ("change_case:english_lowercase", {}, "Sure! Here it is:\n" + LOWER_EN),
    ("punctuation:no_comma", {}, "Hello, world\nno commas below"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* one\n* two\n* P.S. a third star"),
    ("ecd:question_at_end", {}, "Is it ready?\nLet me know."),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "Very well:\nthe answer."),
]


@pytest.mark.parametrize(("rid", "kwargs", "response"), LOOSE_ONLY)
def test_strict_fails_but_loose_passes(rid: str, kwargs: dict, response: str) -> None:
    assert check_strict(rid, response, kwargs) is False
    assert check_loose(rid, response, kwargs) is True


@pytest.mark.parametrize(("rid", "kwargs", "response"), [
    ("punctuation:no_comma", {}, "a, b\nc, d\ne, f"),
    ("detectable_format:json_format", {}, "Sure:\nnot json\nat all"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Bye.\nBye.\nBye."),
])
def test_loose_can_fail_too(rid: str, kwargs: dict, response: str) -> None:
    assert check_loose(rid, response, kwargs) is False


def test_loose_variants_follow_ifeval() -> None:
    response = "*Sure*\nmiddle **bold**\nlast *line*"
    assert cat.loose_variants(response) == [
        response,
        "Sure\nmiddle bold\nlast line",
        "middle **bold**\nlast *line*",
        "*Sure*\nmiddle **bold**",
        "middle **bold**",
        "middle bold\nlast line",
        "Sure\nmiddle bold",
        "middle bold",
    ]
    assert cat.loose_variants("one line") == ["one line", "one line"]
    assert cat.loose_variants("***") == ["***"]  # kept as IFEval keeps it; "" is dropped
    assert cat.loose_variants("  \n ") == []


# --- kwargs handling ---------------------------------------------------------------------------

def test_none_kwargs_are_dropped_as_in_ifeval_jsonl_rows() -> None:
    row = {"num_words": 3, "relation": "less than", "keywords": None, "language": None,
           "end_phrase": None, "num_bullets": None}
    assert check_strict("length_constraints:number_words", "hi there", row)
    assert check_loose("length_constraints:number_words", "hi there", row)
    assert check_strict("punctuation:no_comma", "fine", {"language": None})
    assert check_strict("punctuation:no_comma", "fine", None)


def test_unknown_id_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="unknown requirement type 'keywords:nope'"):
        check_strict("keywords:nope", "x", {})
    with pytest.raises(KeyError, match="unknown requirement type"):
        check_loose("nope", "x", {})


@pytest.mark.parametrize(("rid", "kwargs", "bad"), [
    ("length_constraints:number_words", {"num_words": 3}, "relation"),
    ("length_constraints:number_words", {"num_words": "3", "relation": "at least"},
     "num_words"),
    ("length_constraints:number_words", {"num_words": True, "relation": "at least"},
     "num_words"),
    ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "num_words"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 0,
                                                     "first_word": "so"}, "nth_paragraph"),
    ("ecd:numbered_steps", {"num_steps": 0}, "num_steps"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "relation"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least", "x": 1}, "x"),
    ("keywords:existence", {"keywords": "garden"}, "keywords"),
    ("keywords:existence", {"keywords": []}, "keywords"),
    ("keywords:existence", {"keywords": ["ok", ""]}, "keywords"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1,
                                   "let_relation": "at least"}, "letter"),
    ("language:response_language", {"language": "xx"}, "language"),
    ("ecd:word_count_range", {"min_words": 9, "max_words": 3}, "min_words"),
    ("punctuation:no_comma", {"num_words": 3}, "num_words"),
])
def test_invalid_kwargs_name_the_bad_kwarg(rid: str, kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=f"'{bad}'"):
        CATALOGUE[rid].validate_kwargs(kwargs)
    with pytest.raises(ValueError, match=f"'{bad}'"):
        check_strict(rid, "some response", kwargs)


def test_validate_kwargs_returns_a_clean_copy() -> None:
    t = CATALOGUE["keywords:existence"]
    given_kw = {"keywords": ("a", "b"), "unused": None}
    assert t.validate_kwargs(given_kw) == {"keywords": ["a", "b"]}
    assert given_kw == {"keywords": ("a", "b"), "unused": None}


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_sampled_kwargs_validates_and_every_phrasing_formats(seed: int) -> None:
    for t in CATALOGUE.values():
        kw = t.sample(random.Random(seed))
        assert t.validate_kwargs(kw) == kw
        for i in range(len(t.phrasings)):
            text = t.phrase(kw, _Pick(i))
            assert text.strip() and "{" not in text, (t.id, text)


class _Pick(random.Random):
    """An rng whose choice() returns the i-th item: to format every phrasing."""

    def __init__(self, i: int) -> None:
        super().__init__(0)
        self.i = i

    def choice(self, seq):  # type: ignore[override]
        return seq[self.i]


def test_phrase_shows_lists_and_language_names() -> None:
    rng = random.Random(0)
    text = CATALOGUE["keywords:existence"].phrase({"keywords": ["garden", "river"]}, rng)
    assert '"garden", "river"' in text
    assert "French" in CATALOGUE["language:response_language"].phrase({"language": "fr"}, rng)


def test_sampled_nth_paragraph_is_within_the_paragraph_count() -> None:
    t = CATALOGUE["length_constraints:nth_paragraph_first_word"]
    for seed in range(500):
        kw = t.sample(random.Random(seed))
        assert 1 <= kw["nth_paragraph"] <= kw["num_paragraphs"]


# --- sentence splitter, words, capital words ---------------------------------------------------

@pytest.mark.parametrize(("text", "n"), [
    ("", 0),
    ("No terminal punctuation", 1),
    ("One. Two! Three? Four…", 4),
    ("Wait... what?! Really.", 3),
    ("Mr. and Mrs. Smith met Dr. Jones at St. Mary's vs. the rest.", 1),
    ("It costs 3.50 dollars. See example.com for more.", 2),
    ("Use tools, e.g. a rake, i.e. the U.S. kind. Then rest.", 2),
    ("J. K. Rowling wrote it. P.S. read it.", 2),
    ("1. Mix the flour.\n2. Add water.\n3. Bake.", 3),
    ("1. Mix the flour\n2. Add water\n3. Bake", 1),
    ("\"Stop.\" She left. (Quietly.) **Bold.** Done", 5),
    ("中文句子。日本語の文！質問？", 3),
    ("Café au lait. Naïve résumé. 😀", 2),
])
def test_split_sentences(text: str, n: int) -> None:
    assert ck.count_sentences(text) == n


def test_count_words_and_capital_words() -> None:
    assert ck.count_words("café naïve, don't  stop 😀 3.5") == 7  # don/t and 3/5 split
    assert ck.capital_words("NASA, COVID-19, U.S.A, P.S. DON'T I a Ok 2024") == [
        "NASA", "COVID-19", "U.S.A", "P.S", "DON'T", "I"]


def test_relation_must_be_known() -> None:
    with pytest.raises(ValueError, match="relation"):
        ck.compare(1, "more than", 2)


# --- properties --------------------------------------------------------------------------------

ENGLISH = ("Every morning the children walk to school with their friends.",
           "They talk about what they will do after class.",
           "The garden needs water and sunlight to grow well.",
           "People should read more books about history and science.",
           "It was a long and quiet evening at home.",
           "The weather today is warm and the sky is clear.",
           "Many families travel to the coast during the summer holidays.",
           "She thinks that the new library is a wonderful place to study.")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ENGLISH), min_size=1, max_size=3, unique=True),
       st.lists(st.booleans(), min_size=40, max_size=40))
def test_lower_and_upper_english_pass_the_case_checks(sentences: list[str], caps: list[bool]
                                                      ) -> None:
    words = " ".join(sentences).split()
    text = " ".join(w.upper() if c else w for w, c in zip(words, caps, strict=False))
    assert check_strict("change_case:english_lowercase", text.lower(), {})
    assert check_strict("change_case:english_capital", text.upper(), {})
    assert not check_strict("change_case:english_lowercase", text.capitalize(), {})
    assert not check_strict("change_case:english_capital", text.capitalize(), {})


@settings(deadline=None)
@given(st.text())
def test_removing_commas_passes_no_comma(text: str) -> None:
    stripped = text.replace(",", "")
    assume(stripped.strip())
    assert check_strict("punctuation:no_comma", stripped, {})
    if "," in text:
        assert not check_strict("punctuation:no_comma", text, {})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(deadline=None)
@given(JSON_VALUES, st.booleans(), st.booleans())
def test_json_dumps_passes_json_format(value: object, fenced: bool, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    if fenced:
        text = f"```json\n{text}\n```"
    assert check_strict("detectable_format:json_format", text, {})


COUNTED = [
    ("length_constraints:number_words", "num_words", "relation"),
    ("length_constraints:number_sentences", "num_sentences", "relation"),
    ("change_case:capital_word_frequency", "capital_frequency", "capital_relation"),
]


@pytest.mark.parametrize(("rid", "count", "relation"), COUNTED)
@settings(deadline=None)
@given(text=st.text(min_size=1), n=st.integers(1, 40))
def test_less_than_and_at_least_are_complementary(rid: str, count: str, relation: str,
                                                  text: str, n: int) -> None:
    assume(text.strip())
    less = check_strict(rid, text, {count: n, relation: "less than"})
    least = check_strict(rid, text, {count: n, relation: "at least"})
    assert less != least


@settings(deadline=None)
@given(text=st.text(min_size=1), n=st.integers(1, 5), letter=st.sampled_from("aeZx"))
def test_frequency_relations_are_complementary(text: str, n: int, letter: str) -> None:
    assume(text.strip())
    kw = {"keyword": "ab", "frequency": n}
    assert check_strict("keywords:frequency", text, kw | {"relation": "less than"}) != \
        check_strict("keywords:frequency", text, kw | {"relation": "at least"})
    lk = {"letter": letter, "let_frequency": n}
    assert check_strict("keywords:letter_frequency", text, lk | {"let_relation": "less than"}) \
        != check_strict("keywords:letter_frequency", text, lk | {"let_relation": "at least"})


@settings(deadline=None)
@given(st.text(min_size=1), st.text(min_size=1))
def test_two_different_answers_pass_two_responses(a: str, b: str) -> None:
    assume("******" not in a + b and a.strip() and b.strip() and a.strip() != b.strip())
    assert check_strict("combination:two_responses", f"{a}\n******\n{b}", {})
    assert not check_strict("combination:two_responses", f"{a}\n******\n{a}", {})


@settings(deadline=None)
@given(st.text())
def test_quoted_text_passes_quotation(text: str) -> None:
    assert check_strict("startend:quotation", f'"{text}"', {})


@settings(deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\n\r<>"), min_size=1))
def test_bracketed_title_passes(title: str) -> None:
    assume(title.strip())
    assert check_strict("detectable_format:title", f"Intro\n<<{title}>>\nbody", {})


@settings(deadline=None)
@given(st.integers(1, 8), st.integers(1, 8))
def test_built_lists_pass_their_counts(n: int, m: int) -> None:
    steps = "\n".join(f"{i}. step {i}" for i in range(1, n + 1))
    bullets = "\n".join(f"* point {i}" for i in range(m))
    assert check_strict("ecd:numbered_steps", steps, {"num_steps": n})
    assert not check_strict("ecd:numbered_steps", steps, {"num_steps": n + 1})
    assert check_strict("detectable_format:number_bullet_lists", bullets, {"num_bullets": m})
    paragraphs = "\n***\n".join(f"paragraph {i}" for i in range(n))
    assert check_strict("length_constraints:number_paragraphs", paragraphs,
                        {"num_paragraphs": n})


@settings(deadline=None)
@given(st.text(min_size=1), st.integers(0, 2**16))
def test_strict_pass_implies_loose_pass(text: str, seed: int) -> None:
    assume(text.strip())
    for rid in ("punctuation:no_comma", "ecd:question_at_end", "detectable_format:title",
                "length_constraints:number_words", "ecd:max_paragraphs",
                "keywords:letter_frequency", "ecd:markdown_headings", "startend:quotation"):
        kw = CATALOGUE[rid].sample(random.Random(seed))
        if check_strict(rid, text, kw):
            assert check_loose(rid, text, kw)


@settings(deadline=None)
@given(st.text(), st.integers(1, 30))
def test_max_sentence_words_is_monotone(text: str, n: int) -> None:
    if ck.max_sentence_words(text, n):
        assert ck.max_sentence_words(text, n + 1)


# --- conflicts ---------------------------------------------------------------------------------

def test_conflicts_are_symmetric_and_reflexive() -> None:
    ids = list(CATALOGUE)
    for a in ids:
        assert conflicts(a, a)
        assert a in CATALOGUE[a].conflicts
        for b in ids:
            assert conflicts(a, b) == conflicts(b, a), (a, b)
            assert (b in CATALOGUE[a].conflicts) == (a in CATALOGUE[b].conflicts), (a, b)


def test_ifeval_conflicts_are_kept() -> None:
    pairs = [
        ("change_case:english_lowercase", "change_case:english_capital"),
        ("change_case:capital_word_frequency", "change_case:english_lowercase"),
        ("change_case:capital_word_frequency", "change_case:english_capital"),
        ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
        ("length_constraints:number_paragraphs", "length_constraints:number_sentences"),
        ("startend:quotation", "detectable_format:title"),
        ("detectable_format:multiple_sections", "detectable_format:number_highlighted_sections"),
        ("language:response_language", "startend:end_checker"),
        ("combination:two_responses", "detectable_format:json_format"),
        ("combination:two_responses", "startend:end_checker"),
        ("combination:two_responses", "startend:quotation"),
        ("detectable_format:json_format", "punctuation:no_comma"),
        ("detectable_format:json_format", "startend:end_checker"),
        ("detectable_format:json_format", "startend:quotation"),
        ("detectable_format:json_format", "detectable_content:postscript"),
        ("detectable_format:number_bullet_lists", "ecd:numbered_steps"),
    ]
    for a, b in pairs:
        assert conflicts(a, b), (a, b)
    for rid in CATALOGUE:
        assert conflicts("detectable_format:constrained_response", rid)
    json_ok = {i for i in CATALOGUE if not conflicts("detectable_format:json_format", i)}
    assert json_ok == {"keywords:existence", "keywords:forbidden_words",
                       "ecd:include_numbers", "ecd:no_first_person"}
    for rid, t in CATALOGUE.items():  # JSON conflicts with every other format
        if t.is_format and rid != "detectable_format:json_format":
            assert conflicts(rid, "detectable_format:json_format"), rid


def test_compatible_pairs_that_ifeval_semantics_allow() -> None:
    # IFEval's end checker strips outer quotes; the title may stand anywhere; etc.
    for a, b in [("startend:quotation", "startend:end_checker"),
                 ("change_case:english_lowercase", "detectable_format:title"),
                 ("detectable_content:postscript", "startend:end_checker"),
                 ("startend:end_checker", "ecd:question_at_end"),
                 ("ecd:markdown_table", "detectable_format:number_bullet_lists")]:
        assert not conflicts(a, b), (a, b)
    assert check_strict("startend:end_checker", '"Done. Any other questions?"',
                        {"end_phrase": "Any other questions?"})
    assert check_strict("startend:quotation", '"Done. Any other questions?"', {})


def _draw_chain(rng: random.Random, size: int) -> list[str]:
    present: list[str] = []
    for _ in range(size):
        formats_only = rng.random() < 0.3
        candidates = compatible_types(present, formats_only=formats_only)
        if not candidates:
            break
        present.append(rng.choice(candidates))
    return present


def test_repeated_compatible_draws_never_conflict() -> None:
    for seed in range(2000):
        rng = random.Random(seed)
        present = _draw_chain(rng, rng.randint(1, 16))
        assert len(set(present)) == len(present)
        for i, a in enumerate(present):
            assert CATALOGUE[a].evolvable
            for b in present[i + 1:]:
                assert not conflicts(a, b), (seed, a, b)


# --- vocabularies: what the samplers force into a response stays compatible -------------------

FORCED = (cat.EXISTENCE_POOL + cat.FREQUENCY_POOL + cat.FIRST_WORD_POOL + cat.END_PHRASES
          + cat.POSTSCRIPT_MARKERS + cat.SECTION_SPLITERS + cat.SUMMARY_PREFIXES
          + cat.START_PHRASES + ("for instance",))


def test_forced_vocabulary_is_neutral() -> None:
    pools = [set(cat.EXISTENCE_POOL), set(cat.FREQUENCY_POOL), set(cat.FORBIDDEN_POOL),
             set(cat.FIRST_WORD_POOL)]
    for i, a in enumerate(pools):
        for b in pools[i + 1:]:
            assert not a & b
    for text in FORCED:
        assert "," not in text, text
        assert not set(text.lower()) & set(cat.RARE_LETTERS), text
        assert ck.no_first_person(text), text
        assert ck.keywords_forbidden_words(text, cat.FORBIDDEN_POOL), text
    for kw in cat.FREQUENCY_POOL:  # "less than" draws must not be forced by other words
        assert not any(kw in t.lower() for t in FORCED if t != kw), kw
    for phrase in cat.END_PHRASES:
        assert ck.question_at_end(phrase) and ck.count_words(phrase) < 20
    caps = sum(len(ck.capital_words(t)) for t in cat.SECTION_SPLITERS + cat.POSTSCRIPT_MARKERS
               + cat.END_PHRASES + cat.SUMMARY_PREFIXES + cat.START_PHRASES)
    assert caps - 1 + 4 < 8  # 4 SECTION lines and one marker stay below 'less than' 8


# --- satisfiability: a response meeting every requirement of any compatible set ----------------

FILLER = (  # no commas, first-person words, rare letters, pool words or capitals
"The garden needs water and sunlight to grow well.",
          "Plants grow strong when the soil stays moist and rich.")
PADDING = ("the roots of healthy plants reach deep into the ground where the soil holds water "
           "for many days",
           "gardeners often plant beans and peas in rows so that each plant gets enough room "
           "and light")
SHORT = ("Roots need air.", "Leaves need light.", "Stems need support.", "Buds need warmth.",
         "Bees help flowers.", "Rain helps seeds.", "Mulch keeps soil cool.",
         "Weeds steal water.", "Birds eat pests.", "Worms enrich soil.")
LETTER_LINES = {
    "e": "green trees need deep steady sleep", "t": "tall tomato stems take time to start",
    "a": "a banana and a papaya make a tasty snack", "o": "good onions grow on cool open soil",
    "i": "it is wise to visit the irrigation tanks in spring",
    "n": "onions and nine green bean plants need sun",
    "s": "seeds sprout slowly as spring sunshine starts",
    "r": "rich red roses prefer regular rain in warm regions",
}


def _blocks(reqs: dict[str, dict], variant: int) -> tuple[list[list[str]], list[str]]:
    """Content blocks (lists of lines, kept whole) and the closing line(s)."""
    blocks: list[list[str]] = []
    if "ecd:starts_with" in reqs:
        blocks.append([f"{reqs['ecd:starts_with']['phrase']} for the garden."])
    if "detectable_format:title" in reqs:
        blocks.append(["<<the garden guide>>"])
    blocks.append([FILLER[variant]])
    if {"change_case:english_capital", "change_case:english_lowercase"} & set(reqs):
        blocks.append(list(ENGLISH[:2]))  # enough prose for langdetect, also in capitals
    if (kw := reqs.get("keywords:existence")) is not None:
        blocks.append(["key words: " + " and ".join(kw["keywords"])])
    if (kw := reqs.get("keywords:frequency")) is not None and kw["relation"] == "at least":
        blocks.append([" ".join([kw["keyword"]] * kw["frequency"]) + " matters"])
    if (kw := reqs.get("change_case:capital_word_frequency")) is not None \
            and kw["capital_relation"] == "at least":
        blocks.append(["remember: " + " ".join(["IMPORTANT"] * kw["capital_frequency"])])
    if (kw := reqs.get("keywords:letter_frequency")) is not None \
            and kw["let_relation"] == "at least":
        blocks.append([LETTER_LINES[kw["letter"]]])
    if (kw := reqs.get("detectable_content:number_placeholders")) is not None:
        names = ["name", "address", "date", "place"][: kw["num_placeholders"]]
        blocks.append(["fill in " + " ".join(f"[{n}]" for n in names)])
    if (kw := reqs.get("detectable_format:number_highlighted_sections")) is not None:
        spans = ["soil care", "water plan", "light level", "root health"]
        blocks.append(["remember the " + " and the ".join(
            f"*{s}*" for s in spans[: kw["num_highlights"]])])
    if (kw := reqs.get("ecd:include_numbers")) is not None:
        blocks.append(["plan for " + " and ".join(
            ["3 weeks", "25 liters", "40 minutes"][: kw["num_numbers"]])])
    if (kw := reqs.get("ecd:include_examples")) is not None:
        blocks.append(["for instance roses like sun"] * kw["num_examples"])
    if (kw := reqs.get("detectable_format:multiple_sections")) is not None:
        blocks.append([f"{kw['section_spliter']} {i}" for i in range(1, kw["num_sections"] + 1)])
    if (kw := reqs.get("ecd:numbered_steps")) is not None:
        blocks.append([f"{i}. water the plants" for i in range(1, kw["num_steps"] + 1)])
    if (kw := reqs.get("detectable_format:number_bullet_lists")) is not None:
        blocks.append(["* keep the soil moist"] * kw["num_bullets"])
    if (kw := reqs.get("ecd:markdown_table")) is not None:
        rows = ["| rose | sun |", "| fern | shade |", "| mint | water |", "| sage | light |"]
        blocks.append(["| plant | need |", "| --- | --- |"] + rows[: kw["min_rows"]])
    if (kw := reqs.get("ecd:markdown_headings")) is not None:
        blocks.append(["## Overview", "## Details", "## Care", "## Tips"][: kw["num_headings"]])
    if (kw := reqs.get("ecd:final_summary_line")) is not None:
        tail = [f"{kw['prefix']} water and light keep plants healthy"]
    else:
        last = []
        if (kw := reqs.get("detectable_content:postscript")) is not None:
            last.append(f"{kw['postscript_marker']} water the roots early.")
        if (kw := reqs.get("startend:end_checker")) is not None:
            last.append(kw["end_phrase"])
        elif "ecd:question_at_end" in reqs:
            last.append("Which plant will you choose?")
        tail = [" ".join(last)] if last else [SHORT[-1]]
    return blocks, tail


def _assemble(reqs: dict[str, dict], blocks: list[list[str]], tail: list[str]) -> str:
    if tail:
        blocks = blocks + [tail]
    if (kw := reqs.get("length_constraints:nth_paragraph_first_word")) is not None:
        groups = _group(blocks, kw["num_paragraphs"])
        groups[kw["nth_paragraph"] - 1].insert(0, f"{kw['first_word'].capitalize()} the plants")
        return "\n\n".join("\n".join(g) for g in groups)
    if (kw := reqs.get("length_constraints:number_paragraphs")) is not None:
        groups = _group(blocks, kw["num_paragraphs"])
        return "\n***\n".join("\n".join(g) for g in groups)
    if "ecd:max_paragraphs" in reqs:
        return "\n".join(line for b in blocks for line in b)
    return "\n\n".join("\n".join(b) for b in blocks)


def _group(blocks: list[list[str]], n: int) -> list[list[str]]:
    blocks = list(blocks)
    while len(blocks) < n:
        blocks.insert(1, [SHORT[len(blocks) % len(SHORT)]])
    head, rest = blocks[: n - 1], blocks[n - 1:]
    return [list(b) for b in head] + [[line for b in rest for line in b]]


def _body(reqs: dict[str, dict], variant: int = 0) -> str:
    blocks, tail = _blocks(reqs, variant)
    text = _assemble(reqs, blocks, tail)
    want_words = max(reqs.get("ecd:word_count_range", {}).get("min_words", 0),
                     reqs.get("length_constraints:number_words", {"relation": ""})["num_words"]
                     if reqs.get("length_constraints:number_words", {}).get("relation")
                     == "at least" else 0)
    pad = 0
    while ck.count_words(text) < want_words:
        blocks.insert(1, [PADDING[pad % 2]])
        pad += 1
        text = _assemble(reqs, blocks, tail)
    kw = reqs.get("length_constraints:number_sentences")
    extra = 0
    while kw and kw["relation"] == "at least" and ck.count_sentences(text) < kw["num_sentences"]:
        blocks.insert(1, [SHORT[extra % len(SHORT)]])
        extra += 1
        text = _assemble(reqs, blocks, tail)
    if "change_case:english_capital" in reqs:
        text = text.upper()
    if "change_case:english_lowercase" in reqs:
        text = text.lower()
    return text


def witness(reqs: dict[str, dict]) -> str:
    """A response meant to meet every requirement of a compatible set ``reqs``."""
    if "detectable_format:constrained_response" in reqs:
        return "My answer is yes."
    if "detectable_format:json_format" in reqs:
        words = ["the garden grows"] + reqs.get("keywords:existence", {}).get("keywords", [])
        words += ["3 4 5"] if "ecd:include_numbers" in reqs else []
        return json.dumps({"answer": " ".join(words)})
    if "combination:two_responses" in reqs:
        return _body(reqs, 0) + "\n******\n" + _body(reqs, 1)
    text = _body(reqs)
    return f'"{text}"' if "startend:quotation" in reqs else text


def test_witness_meets_a_single_requirement() -> None:
    for rid, t in CATALOGUE.items():
        if not t.evolvable:
            continue
        for seed in range(20):
            kw = t.sample(random.Random(seed))
            text = witness({rid: kw})
            assert check_strict(rid, text, kw), (rid, kw, text)


def test_every_compatible_set_is_satisfiable() -> None:
    """Sampled kwargs of any compatible set can hold together: a built response meets all."""
    for seed in range(2000):
        rng = random.Random(seed)
        chain = _draw_chain(rng, rng.randint(1, 16))
        reqs = {rid: CATALOGUE[rid].sample(rng) for rid in chain}
        text = witness(reqs)
        failed = [rid for rid, kw in reqs.items() if not check_strict(rid, text, kw)]
        assert not failed, (seed, failed, reqs, text)


def test_a_real_looking_ifeval_row() -> None:
    response = ("<<A Day At The Lake>>\n\nThe lake was calm, and the children played by the "
                "shore.\n\n*Morning* came early and *evening* came late.\n\nP.S. Bring a hat.")
    ids = ["detectable_format:title", "detectable_format:number_highlighted_sections",
           "detectable_content:postscript", "punctuation:no_comma"]
    kwargs = [{"num_highlights": None, "postscript_marker": None},
              {"num_highlights": 2, "postscript_marker": None},
              {"num_highlights": None, "postscript_marker": "P.S."}, {}]
    got = [check_strict(i, response, kw) for i, kw in zip(ids, kwargs, strict=True)]
    assert got == [True, True, True, False]
    assert re.search("lake", response)


# --- statedness: does a (rewritten) instruction state the requirement? ------------------------

S = "Describe the water cycle."  # a seed instruction that states none of the requirements
SECTION_UP = {"section_spliter": "SECTION", "num_sections": 3}
NTH_2_OF_3 = {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "however"}

# (id, kwargs, instruction, stated?): paraphrases a teacher might write, and rewrites that drop
# the requirement or change one of its values
STATED_CASES = [
    ("keywords:existence", {"keywords": ["garden", "river"]},
     f"{S} Mention a Garden and the river that runs by it.", True),
    ("keywords:existence", {"keywords": ["garden", "river"]},
     f"{S} Mention a garden and the stream that runs by it.", False),
    ("keywords:frequency", KW_FREQ, f"{S} Use the word 'energy' at least three times.", True),
    ("keywords:frequency", KW_FREQ, f"{S} Say “energy” 3 or more times.", True),
    ("keywords:frequency", KW_FREQ, f"{S} Use the word 'energy' at least twice.", False),
    ("keywords:frequency", KW_FREQ, f"{S} Use the word 'energy' exactly 3 times.", False),
    ("keywords:frequency", KW_FREQ, f"{S} Use the word 'energy' no more than 3 times.", False),
    ("keywords:frequency", KW_FREQ_LT, f"{S} Use 'energy' fewer than two times.", True),
    ("keywords:frequency", KW_FREQ_LT, f"{S} Use 'energy' at least twice.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]},
     f'{S} Avoid the words "very" and "just".', True),
    ("keywords:forbidden_words", {"forbidden_words": ["very", "just"]},
     f'{S} Avoid the word "very".', False),
    ("keywords:letter_frequency", LETTER_E, f"{S} The letter 'e' must appear at least 3 times.",
     True),
    ("keywords:letter_frequency", LETTER_Z, f"{S} Use the letter z fewer than 2 times.", True),
    ("keywords:letter_frequency", LETTER_Z, f"{S} Use the letter x fewer than 2 times.", False),
    ("keywords:letter_frequency", LETTER_Z, f"{S} Use the letter z at least 2 times.", False),
    ("language:response_language", {"language": "fr"}, f"{S} Respond only in french.", True),
    ("language:response_language", {"language": "fa"}, f"{S} Write it in Farsi.", True),
    ("language:response_language", {"language": "fr"}, f"{S} Respond only in Spanish.", False),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": "at least"},
     f"{S} Write no fewer than five sentences.", True),
    ("length_constraints:number_sentences", {"num_sentences": 10, "relation": "less than"},
     f"{S} Keep it under 10 sentences.", True),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": "at least"},
     f"{S} Write five sentences.", False),
    ("length_constraints:number_sentences", {"num_sentences": 10, "relation": "less than"},
     f"{S} Write at least 10 sentences.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     f"{S} Use three paragraphs separated by ***.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     f"{S} Use three paragraphs.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     f"{S} Use 4 paragraphs separated by *** and 3 bullet points.", False),
    ("length_constraints:number_words", {"num_words": 250, "relation": "less than"},
     f"{S} Your answer must be less than two hundred and fifty words.", True),
    ("length_constraints:number_words", {"num_words": 80, "relation": "at least"},
     f"{S} Write 80+ words.", True),
    ("length_constraints:number_words", {"num_words": 250, "relation": "less than"},
     f"{S} Your answer must be less than 200 words.", False),
    ("length_constraints:nth_paragraph_first_word", NTH_2_OF_3,
     f"{S} Write 3 paragraphs separated by blank lines; the second paragraph starts with "
     "'However'.", True),
    ("length_constraints:nth_paragraph_first_word", NTH_2_OF_3,
     f"{S} Write three paragraphs. Paragraph 2 must begin with however.", True),
    ("length_constraints:nth_paragraph_first_word", NTH_2_OF_3,
     f"{S} Write 3 paragraphs; the third paragraph starts with 'However'.", False),
    ("length_constraints:nth_paragraph_first_word", NTH_2_OF_3,
     f"{S} Write 3 paragraphs; the second paragraph starts with 'Moreover'.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     f"{S} Leave two placeholders in square brackets such as [name].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 1},
     f"{S} Leave a placeholder like [name] for the reader.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     f"{S} Leave two placeholders for the reader.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     f"{S} Add a p.s. at the end.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     f"{S} End with a postscript starting with P.P.S.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     f"{S} End with a postscript starting with P.P.S.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     f"{S} End with a short postscript.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 4},
     f"{S} Give exactly four markdown bullet points.", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 4},
     f"{S} Give exactly four points.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 4},
     f"{S} Use three bullet points, like:\n* point 4", False),
    ("detectable_format:constrained_response", {},
     'Is it wet? Answer "My answer is yes.", "My answer is no." or "My answer is maybe."', True),
    ("detectable_format:constrained_response", {}, "Is it wet? Answer yes or no.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     f"{S} Highlight at least 2 sections with markdown.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     f"{S} Italicize two key phrases, like *this*.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     f"{S} Highlight three sections with markdown.", False),
    ("detectable_format:multiple_sections", SECTION_UP,
     f"{S} Use three sections, each starting with SECTION X.", True),
    ("detectable_format:multiple_sections", SECTION_UP,
     f"{S} Use three sections, each starting with Section X.", False),  # case matters
    ("detectable_format:multiple_sections", SECTION_UP,
     f"{S} Use sections headed SECTION 1, SECTION 2, SECTION 3.", False),  # labels, no count
    ("detectable_format:json_format", {}, f"{S} Reply in json.", True),
    ("detectable_format:json_format", {}, f"{S} Reply in YAML.", False),
    ("detectable_format:title", {}, f"{S} Add a title like <<Rain>>.", True),
    ("detectable_format:title", {}, f"{S} Add a title in double angle brackets.", True),
    ("detectable_format:title", {}, f"{S} Add a title.", False),
    ("combination:two_responses", {}, f"{S} Give two answers separated by ******.", True),
    ("combination:two_responses", {}, f"{S} Give two answers separated by a blank line.",
     False),
    ("combination:repeat_prompt", {"prompt_to_repeat": S},
     f"{S} Repeat this request word for word first, then answer it.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": S}, f"{S} Answer it first.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     f'{S} End with the phrase "any other questions?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     f'{S} End with the phrase "Any questions?"', False),
    ("startend:quotation", {}, f"{S} Wrap the answer in double quotes.", True),
    ("startend:quotation", {}, f"{S} Wrap the answer in a code block.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3,
                                            "capital_relation": "at least"},
     f"{S} Use at least 3 words in ALL CAPS.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 10,
                                            "capital_relation": "less than"},
     f"{S} Use fewer than ten all-capital words.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3,
                                            "capital_relation": "at least"},
     f"{S} Use at least 3 words in bold.", False),
    ("change_case:english_capital", {}, f"{S} Write it all in UPPERCASE English.", True),
    ("change_case:english_capital", {}, "What is the capital of France? Answer in English.",
     False),
    ("change_case:english_capital", {}, f"{S} Use no capital letters.", False),
    ("change_case:english_lowercase", {}, f"{S} Write it in lower-case English.", True),
    ("change_case:english_lowercase", {}, f"{S} Write it in English.", False),
    ("punctuation:no_comma", {}, f"{S} Do not use commas.", True),
    ("punctuation:no_comma", {}, f"{S} Do not use semicolons.", False),
    ("ecd:word_count_range", {"min_words": 50, "max_words": 200},
     f"{S} Write between fifty and two hundred words.", True),
    ("ecd:word_count_range", {"min_words": 50, "max_words": 200},
     f"{S} Write between 50 and 150 words.", False),
    ("ecd:numbered_steps", {"num_steps": 4}, f"{S} Explain it in 4 numbered steps.", True),
    ("ecd:numbered_steps", {"num_steps": 4}, f"{S} Explain it in 4 steps.", False),
    ("ecd:markdown_table", {"min_rows": 3}, f"{S} Add a markdown table with 3+ rows.", True),
    ("ecd:markdown_table", {"min_rows": 3}, f"{S} Add a markdown table.", False),
    ("ecd:max_sentence_words", {"max_words": 20},
     f"{S} Keep sentences to 20 words or fewer.", True),
    ("ecd:max_sentence_words", {"max_words": 20},
     f"{S} Sentences must not be longer than twenty words.", True),
    ("ecd:max_sentence_words", {"max_words": 20},
     f"{S} Sentences must be longer than twenty words.", False),
    ("ecd:final_summary_line", {"prefix": "Summary:"},
     f'{S} Finish with a line that starts with "summary:".', True),
    ("ecd:final_summary_line", {"prefix": "Summary:"}, f"{S} Finish with a summary.", False),
    ("ecd:starts_with", {"phrase": "In brief"}, f'{S} Start with "In brief".', True),
    ("ecd:starts_with", {"phrase": "In brief"}, f"{S} Be brief.", False),
    ("ecd:include_numbers", {"num_numbers": 2}, f"{S} Cite two figures in digits.", True),
    ("ecd:include_numbers", {"num_numbers": 2}, f"{S} Cite some figures.", False),
    ("ecd:question_at_end", {}, f"{S} Close by asking the reader a question.", True),
    ("ecd:question_at_end", {}, "Answer this question: why does it rain?", False),
    ("ecd:no_first_person", {}, f"{S} Avoid first-person pronouns.", True),
    ("ecd:no_first_person", {}, f"{S} Avoid jargon.", False),
    ("ecd:no_first_person", {}, "Describe yourself.", False),
    ("ecd:markdown_headings", {"num_headings": 3}, f"{S} Use 3 markdown headings.", True),
    ("ecd:markdown_headings", {"num_headings": 3}, f"{S} Use 2 markdown headings.", False),
    ("ecd:max_paragraphs", {"max_paragraphs": 4}, f"{S} Use at most four paragraphs.", True),
    ("ecd:max_paragraphs", {"max_paragraphs": 4}, f"{S} Use four paragraphs.", False),
    ("ecd:include_examples", {"num_examples": 1},
     f'{S} Give an example, introduced by "for example".', True),
    ("ecd:include_examples", {"num_examples": 2}, f"{S} Give two examples.", False),
]


def test_every_catalogue_type_has_a_statedness_check() -> None:
    assert set(STATED_CHECKS) == set(CATALOGUE)
    with pytest.raises(KeyError, match="no statedness check"):
        stated("keywords:nope", {}, S)


@pytest.mark.parametrize(("rid", "kwargs", "instruction", "expected"), STATED_CASES)
def test_stated_cases(rid: str, kwargs: dict, instruction: str, expected: bool) -> None:
    problem = stated(rid, CATALOGUE[rid].validate_kwargs(kwargs), instruction)
    assert (problem is None) is expected, problem
    if problem is not None:
        assert problem.strip() and "\n" not in problem


def test_every_type_has_stated_and_unstated_cases() -> None:
    for rid in CATALOGUE:
        outcomes = [exp for r, _, _, exp in STATED_CASES if r == rid]
        assert True in outcomes and False in outcomes, rid


def test_the_seed_alone_states_nothing() -> None:
    for rid, t in CATALOGUE.items():
        for seed in range(20):
            assert stated(rid, t.sample(random.Random(seed)), S) is not None, rid


@pytest.mark.parametrize(("text", "values"), [
    ("two hundred and fifty words", [250]),
    ("twenty-one, 1,000 and thirty five", [21, 1000, 35]),
    ("at least twice, a single one", [2, 1, 1, 1]),
    ("between forty and one hundred forty", [40, 140]),
    ("3.5 and 12th and 7", [7]),
])
def test_numbers_in_instructions(text: str, values: list[int]) -> None:
    assert sorted(v for v, _ in st_numbers(text)) == sorted(values)


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["", S + " ", S + "\n\n"]))
def test_every_template_phrasing_states_its_requirement(seed: int, prefix: str) -> None:
    """Template mode appends a phrasing; it must pass ``stated`` (this checks both sides)."""
    for t in CATALOGUE.values():
        kw = t.sample(random.Random(seed))
        for i in range(len(t.phrasings)):
            text = prefix + t.phrase(kw, _Pick(i))
            assert stated(t.id, kw, text) is None, (t.id, kw, text)


def _changed(t: RequirementType, kw: dict, name: str, rng: random.Random) -> dict | None:
    """``kw`` with kwarg ``name`` changed to another valid value, or None if there is none."""
    value = kw[name]
    if isinstance(value, int):
        new: object = value + 1
    elif isinstance(value, list):
        pool = [w for w in (*cat.EXISTENCE_POOL, *cat.FORBIDDEN_POOL) if w not in value]
        new = [*value[:-1], rng.choice(pool)]
    else:
        others = {t.sample(random.Random(s))[name] for s in range(50)} - {value}
        if not others:
            return None
        new = rng.choice(sorted(others))
    changed = {**kw, name: new}
    try:
        return t.validate_kwargs(changed)
    except ValueError:
        return None


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_phrasing_does_not_state_changed_values(seed: int) -> None:
    """A rewrite that keeps the wording but changes a count or a keyword is caught."""
    rng = random.Random(seed)
    for t in CATALOGUE.values():
        if t.id == "combination:repeat_prompt":
            continue  # its kwarg is the request itself, which the instruction need not quote
        kw = t.sample(rng)
        for name in kw:
            changed = _changed(t, kw, name, rng)
            if changed is None:
                continue
            for i in range(len(t.phrasings)):
                text = t.phrase(kw, _Pick(i))
                assert stated(t.id, changed, text) is not None, (t.id, changed, text)
