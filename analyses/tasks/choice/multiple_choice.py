"""The multiple-choice tasks: larger number, capital and odd one out (word lists, templates, designs)."""

from __future__ import annotations

import math

from analyses.tasks.choice.design import Design, common_length, lettered_options, pick, unrank_combination
from analyses.tasks.choice.items import ChoiceItem

# ---------------------------------------------------------------------------------------- numbers

NUMBER_RANGE = (1, 999)  # inclusive
N_NUMBER_OPTIONS = 2
_N_NUMBERS = NUMBER_RANGE[1] - NUMBER_RANGE[0] + 1


def _render_larger_number(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    rank, *order = digits
    values = [NUMBER_RANGE[0] + v for v in unrank_combination(rank, _N_NUMBERS, N_NUMBER_OPTIONS)]
    largest, smaller = values[-1], pick(values[:-1], order)
    options = [*smaller[:label], largest, *smaller[label:]]
    question = "Which number is larger?" if N_NUMBER_OPTIONS == 2 else "Which number is the largest?"
    return lettered_options(question, [str(v) for v in options])


LARGER_NUMBER_DESIGN = Design(
    "larger_number",
    "multiple_choice",
    N_NUMBER_OPTIONS,
    (math.comb(_N_NUMBERS, N_NUMBER_OPTIONS), *range(N_NUMBER_OPTIONS - 1, 0, -1)),
    _render_larger_number,
)


def make_larger_number(n: int, seed: int) -> list[ChoiceItem]:
    """Which of two numbers from 1 to 999 is larger; the answer letter's position is balanced."""
    return LARGER_NUMBER_DESIGN.sample(n, seed)


# ---------------------------------------------------------------------------------------- capitals

# Countries with one undisputed capital, names in ASCII.
CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"),
    ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Switzerland", "Bern"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Iceland", "Reykjavik"),
    ("Russia", "Moscow"),
    ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Morocco", "Rabat"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"),
    ("Senegal", "Dakar"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Afghanistan", "Kabul"),
    ("Nepal", "Kathmandu"),
    ("Mongolia", "Ulaanbaatar"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("the United States", "Washington"),
    ("Cuba", "Havana"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"),
    ("Jamaica", "Kingston"),
)
CAPITAL_QUESTIONS = ("What is the capital of {country}?", "Which city is the capital of {country}?")
N_CAPITAL_OPTIONS = 4


def _render_capital(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    q, country, *others = digits
    distractors = pick([i for i in range(len(CAPITALS)) if i != country], others)
    order = [*distractors[:label], country, *distractors[label:]]
    question = CAPITAL_QUESTIONS[q].format(country=CAPITALS[country][0])
    return lettered_options(question, [CAPITALS[i][1] for i in order])


CAPITAL_DESIGN = Design(
    "capital",
    "multiple_choice",
    N_CAPITAL_OPTIONS,
    (
        len(CAPITAL_QUESTIONS),
        len(CAPITALS),
        *(len(CAPITALS) - 1 - i for i in range(N_CAPITAL_OPTIONS - 1)),
    ),
    _render_capital,
)


def make_capital(n: int, seed: int) -> list[ChoiceItem]:
    """The capital of a country among four capitals (three distractors); answer letter balanced."""
    return CAPITAL_DESIGN.sample(n, seed)


# ---------------------------------------------------------------------------------------- odd one out

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "apricot"),
    "animal": ("dog", "cat", "horse", "rabbit", "tiger", "lion", "sheep", "wolf", "elephant", "mouse"),
    "tool": (
        "hammer",
        "wrench",
        "screwdriver",
        "trowel",
        "drill",
        "chisel",
        "pliers",
        "shovel",
        "axe",
        "rake",
    ),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "tram", "motorbike", "van", "tractor", "scooter"),
    "instrument": (
        "piano",
        "violin",
        "guitar",
        "trumpet",
        "flute",
        "drum",
        "cello",
        "harp",
        "clarinet",
        "saxophone",
    ),
    "furniture": (
        "chair",
        "table",
        "sofa",
        "bed",
        "wardrobe",
        "desk",
        "shelf",
        "stool",
        "cupboard",
        "armchair",
    ),
    "clothing": ("shirt", "jacket", "sock", "trousers", "dress", "coat", "scarf", "skirt", "sweater", "hat"),
    "body part": ("arm", "leg", "elbow", "knee", "shoulder", "finger", "ankle", "wrist", "toe", "nose"),
}
N_ODD_OPTIONS = 4
_CATEGORY_NAMES = tuple(CATEGORIES)
_CATEGORY_SIZE = common_length(list(CATEGORIES.values()), "category")


def _render_odd_one_out(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    main, odd, *rest = digits
    main_words = CATEGORIES[_CATEGORY_NAMES[main]]
    odd_category = pick([i for i in range(len(CATEGORIES)) if i != main], [odd])[0]
    picked = pick(range(len(main_words)), rest[:-1])
    words = [main_words[i] for i in picked]
    odd_word = CATEGORIES[_CATEGORY_NAMES[odd_category]][rest[-1]]
    return lettered_options(
        "Which word does not belong with the others?", [*words[:label], odd_word, *words[label:]]
    )


ODD_ONE_OUT_DESIGN = Design(
    "odd_one_out",
    "multiple_choice",
    N_ODD_OPTIONS,
    (
        len(CATEGORIES),
        len(CATEGORIES) - 1,
        *(_CATEGORY_SIZE - i for i in range(N_ODD_OPTIONS - 1)),
        _CATEGORY_SIZE,
    ),
    _render_odd_one_out,
)


def make_odd_one_out(n: int, seed: int) -> list[ChoiceItem]:
    """Three words of one category and one of another; the answer is the other one's letter."""
    return ODD_ONE_OUT_DESIGN.sample(n, seed)
