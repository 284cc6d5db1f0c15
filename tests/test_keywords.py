"""The keyword matcher: regular inflections, whole words only, case-insensitive, phrases, coverage."""

from __future__ import annotations

import pytest

from refiners.keywords import coverage, inflections, keyword_forms, keyword_present


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("dance", "They dance all night."),
        ("dance", "She dances well."),
        ("dance", "We danced until dawn."),
        ("dance", "Kids were dancing in the room."),
        ("city", "The city is loud."),
        ("city", "Big cities never sleep."),
        ("stop", "Please stop here."),
        ("stop", "The bus stops here."),
        ("stop", "The bus stopped suddenly."),
        ("stop", "It kept stopping."),
        ("try", "I tried twice."),
        ("try", "She tries again."),
        ("try", "Keep trying."),
        ("box", "Three boxes arrived."),
        ("travel", "They travelled far."),
        ("travel", "They traveled far."),
        ("tie", "He was tying his shoes."),
        ("see", "I am seeing things."),
        ("frisbee", "Two frisbees flew by."),
        ("ice cream", "I want ice cream now."),
        ("ice cream", "Two ice creams, please."),
        ("ice cream", "An ice   cream cone."),
        ("ice cream", "ice\ncream"),
    ],
)
def test_regular_inflections_match(keyword: str, text: str) -> None:
    assert keyword_present(keyword, text)


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("cat", "A category of things."),
        ("cat", "Concatenate the strings."),
        ("cat", "A bobcat ran off."),
        ("dance", "The dancer bowed."),
        ("stop", "A bottle stopper."),
        ("park", "We parkour on weekends."),
        ("ice cream", "Ice is cold and cream is rich."),
        ("ice cream", "creams of ice"),
        ("run", "He ran home."),  # irregular forms are documented not to count
        ("dog", "dog2 is a username"),
        ("dance", "the dance_floor"),
    ],
)
def test_whole_words_only(keyword: str, text: str) -> None:
    assert not keyword_present(keyword, text)


@pytest.mark.parametrize(
    "keyword, text",
    [("dog", "DOG!"), ("Dog", "a dog."), ("PARK", "In the Park."), ("Ice Cream", "ICE CREAMS")],
)
def test_matching_is_case_insensitive(keyword: str, text: str) -> None:
    assert keyword_present(keyword, text)


@pytest.mark.parametrize("text", ["cat.", "(cat)", "'cat'", "cat", "the cat, the hat", "cats!", "«cat»"])
def test_punctuation_and_text_edges_are_word_boundaries(text: str) -> None:
    assert keyword_present("cat", text)


def test_keyword_is_stripped_and_empty_keyword_never_matches() -> None:
    assert keyword_present("  dog  ", "a dog")
    assert not keyword_present("", "anything")
    assert not keyword_present("   ", "anything at all")


def test_regex_metacharacters_in_keywords_are_literal() -> None:
    assert keyword_present("c++", "I like c++ a lot.")
    assert not keyword_present("a.b", "axb")
    assert keyword_present("a.b", "see a.b here")
    assert not keyword_present("(x", "x")


def test_inflections_are_base_plural_past_gerund() -> None:
    assert inflections("dance") == ["dance", "dances", "danced", "dancing"]
    assert inflections("stop") == ["stop", "stops", "stopped", "stopping"]
    assert inflections("try") == ["try", "tries", "tried", "trying"]
    assert inflections("city")[:2] == ["city", "cities"]
    assert inflections("box")[:2] == ["box", "boxes"]
    assert inflections("tie")[3] == "tying"
    assert inflections("Dance")[0] == "dance"


@pytest.mark.parametrize(
    "word, gerund", [("see", "seeing"), ("agree", "agreeing"), ("frisbee", "frisbeeing")]
)
def test_gerund_of_words_ending_in_ee_keeps_the_e(word: str, gerund: str) -> None:
    # The refiner inserts these spellings (Vocabulary.keyword_spellings), so they must be real words.
    assert inflections(word)[3] == gerund


def test_misspelt_gerund_does_not_count_as_a_keyword() -> None:
    # "seing" is not a form of "see"; accepting it would let a refinement "cover" a keyword with a typo.
    assert not keyword_present("see", "I was seing it.")


def test_phrase_inflects_its_last_word_only() -> None:
    forms = keyword_forms("ice cream")
    assert {"ice cream", "ice creams"} <= forms
    assert all(f.startswith("ice ") for f in forms)
    assert keyword_forms("") == set()


def test_coverage_is_the_fraction_of_keywords_present() -> None:
    assert coverage(["dog", "frisbee", "park"], "A dog runs in the park.") == pytest.approx(2 / 3)
    assert coverage(("dog", "frisbee", "park"), "Dogs catch frisbees in parks.") == 1.0
    assert coverage(["dog", "frisbee"], "A cat.") == 0.0
    assert coverage([], "anything") == 1.0
    assert coverage((), "") == 1.0
