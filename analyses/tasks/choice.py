"""Zero-shot choice tasks: seeded offline generators, a loader for user files, and scoring.

Background
----------
Attention calibration (ACT, Yu et al. 2024) keeps or drops an edit of a head by whether it raises
*accuracy* on downstream tasks, scored zero-shot: a classification prompt ends in a cue such as
``Sentiment:`` and the model's next-token distribution at the final prompt position is read at the
label words (``" negative"``, ``" positive"``); a multiple-choice prompt lists options ``A. …`` and
is read at the option letters (``" A"``, ``" B"``, …). No dataset can be downloaded offline, so this
module writes its own: six task generators, each a seeded function of ``(n, seed)`` over word lists
and templates written for it, with thousands of distinct items each (``TaskSpec.capacity``), labels
balanced, and answer letters spread evenly over the positions. Real datasets come in through
:func:`load_jsonl` (one ``{"prompt", "choices", "label"}`` object per line).

=================  ===============  ============================================  ===========
task               kind             answer                                        capacity
=================  ===============  ============================================  ===========
``sentiment``      classification   `` negative`` / `` positive``                 57,600
``topic``          classification   `` sports`` `` science`` `` food`` … (6)      12,000
``larger_number``  multiple choice  letter of the larger of two numbers (1–999)   997,002
``capital``        multiple choice  letter of the country's capital (4 options)   138,378,240
``object_colour``  classification   `` red`` `` yellow`` … `` brown`` (7)         44,800
``odd_one_out``    multiple choice  letter of the word from another category (4)  1,612,800
=================  ===============  ============================================  ===========

Capacity is the number of distinct prompts a generator can yield with balanced labels; asking for
more raises :class:`~probe.errors.ConfigError`. Each task is a product space (templates × word
choices × answer position) and a seed draws distinct points of it without replacement.

No prompt has few-shot examples. A classification prompt is an instruction line that names the
task *without listing the labels*, a blank line, the text, and a cue (``Sentiment:``, ``Topic:``,
``Colour:``): listing the label words in the instruction made SmolLM2-135M copy the first listed
word (topic accuracy 0.23 with the list, 1.00 without; 60 items). A multiple-choice prompt has
ACT's layout: the question, one ``X. option`` line per option, then ``Answer:``. SmolLM2-135M does not read
option letters at all (it answers `` A`` to every item, so MC accuracy equals the share of items
whose answer is A, i.e. chance); its classification tasks are far above chance. Use the MC tasks
with larger models, or bring a cloze-style file through :func:`load_jsonl`.

Scoring (what :func:`choice_logprobs` reads, and why)
------------------------------------------------------
Every forward pass goes through ``model.bridge``, so that pattern edits and other hooks
(``probe.interventions``) act when scoring runs inside their context managers. The prompt is
tokenized alone (no BOS; ``model.batch_from_ids`` applies the model's BOS policy and left-pads). A
choice's tokens are the tail of the tokenization of ``prompt + choice`` after the prompt's own
tokens (the choice as the model would generate it after this prompt); where a merge across the
boundary makes the prompt's tokens no prefix of the joint ones, the choice is tokenized alone.

* A choice of **one token** (every built-in choice on SmolLM2 and Gemma 3: the label words with
  their leading space and the letters `` A`` … are single tokens; a real-model test checks it) is
  scored by the log-softmax at the final prompt position, read at that token: one forward pass per
  item. This is ACT's rule, "the label word's last token at the final position": ACT's code
  encodes each label word alone with a BOS in front and takes index ``-1``, which for a one-token
  word is the word itself.
* **Several tokens**, default ``choice_token="first"``: a choice is scored by its first token at the
  final prompt position, the standard single-pass zero-shot rule, whenever the choices' first
  tokens differ. The first token is the only one whose probability there is the probability of
  *starting* that choice; the last sub-word piece of a word (``"ment"`` of ``" entailment"``) is no
  continuation of the prompt at all. Where choices share their first tokens (a byte-level
  tokenizer's `` A`` = ``[" ", "A"]``, or `` sports`` and `` science`` = ``" s"…``), one token
  cannot separate them, so the score follows the chain rule up to the first token that no other
  choice shares: ``log p(" ") + log p("s" | " ") + log p("p" | " s")``, the log-probability of the
  shortest beginning that commits to the choice. This needs one more forward pass per distinct
  shared beginning; it reduces to the single-token rule whenever first tokens differ.
* ``choice_token="last"`` reproduces ACT's code literally: the last token of each choice, read at
  the final prompt position (meaningful only for one-token choices).
* A choice that is a token prefix of another (`` blue`` and `` blueberry`` when `` blue`` is
  one token) cannot be told apart and raises :class:`~probe.errors.ConfigError`, as do choices
  with the same last token under ``"last"``.

Log-probabilities are those of the full vocabulary (not renormalised over the choices); the
prediction is their argmax over the item's choices, the margin the label's log-probability minus
the best other choice's.

Usage
-----
::

    from analyses.tasks import choice

    items = choice.make_task("capital", 200, seed=0)        # or choice.load_jsonl("my_data.jsonl")
    calibration, heldout = choice.split(items, 0.5, seed=0)
    frame = choice.evaluate(model, heldout)                  # one row per item
    choice.summarise(frame)                                  # accuracy per task with 95% interval

References
----------
* Yu, Wang, Fu, Shi, Shaikh & Lin (2024). Unveiling and Harnessing Hidden Attention Sinks: Enhancing
  Large Language Models without Training through Attention Calibration. ICML.
* Efron & Tibshirani (1993). An Introduction to the Bootstrap, ch. 13 (percentile intervals).
"""

from __future__ import annotations

import difflib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import pandas as pd
import torch

from probe.errors import ConfigError

if TYPE_CHECKING:
    from probe.loading import LoadedModel

TaskKind = Literal["classification", "multiple_choice"]
ChoiceToken = Literal["first", "last"]
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class ChoiceItem:
    """One zero-shot question: the prompt, its choices as continuations, and the right one.

    For classification the choices are label words with their leading space (``" positive"``), so
    that each is the natural next word after a prompt ending in a cue (``"Sentiment:"``). For
    multiple choice the prompt lists the options ``A. …`` and the choices are `` A``, `` B``, ….
    """

    prompt: str
    choices: tuple[str, ...]
    label: int
    task: str
    kind: TaskKind

    def __post_init__(self) -> None:
        problem = _item_problem(self.prompt, self.choices, self.label, self.kind)
        if problem:
            raise ConfigError(f"bad choice item for task {self.task!r}: {problem}")

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "choices": list(self.choices),
            "label": self.label,
            "task": self.task,
            "kind": self.kind,
        }


def _item_problem(prompt: object, choices: object, label: object, kind: object) -> str | None:
    """What is wrong with an item's fields (with the fix), or None."""
    if not isinstance(prompt, str) or not prompt:
        return "'prompt' must be a non-empty string"
    if not isinstance(choices, list | tuple) or len(choices) < 2:
        return "'choices' must be a list of at least two strings"
    if not all(isinstance(c, str) and c for c in choices):
        return "every choice must be a non-empty string (label words with a leading space, e.g. ' yes')"
    if len(set(choices)) != len(choices):
        return f"choices {list(choices)!r} repeat a choice; give each choice once"
    if len(choices) > len(LETTERS):
        return f"at most {len(LETTERS)} choices are supported; got {len(choices)}"
    if isinstance(label, bool) or not isinstance(label, int):
        return f"'label' must be an integer index into the choices, got {label!r}"
    if not 0 <= label < len(choices):
        return f"'label' {label} is out of range for {len(choices)} choices; use 0..{len(choices) - 1}"
    if kind not in get_args(TaskKind):
        return f"'kind' {kind!r} is unknown; use 'classification' or 'multiple_choice'"
    return None


# ---------------------------------------------------------------------------------------- sampling


def _pick(pool: Sequence[int], digits: Sequence[int]) -> list[int]:
    """Take ``pool[d]`` for each digit, removing each pick: an ordered draw without replacement."""
    rest = list(pool)
    return [rest.pop(d) for d in digits]


def _digits(index: int, radices: Sequence[int]) -> tuple[int, ...]:
    """Mixed-radix digits of ``index`` (first radix most significant)."""
    out = []
    for radix in reversed(radices):
        index, digit = divmod(index, radix)
        out.append(digit)
    return tuple(reversed(out))


def _unrank_combination(rank: int, n: int, k: int) -> list[int]:
    """The ``rank``-th ``k``-subset of ``range(n)`` in lexicographic order."""
    out: list[int] = []
    x = 0
    for remaining in range(k, 0, -1):
        while True:
            count = math.comb(n - x - 1, remaining - 1)  # subsets whose next element is x
            if rank < count:
                out.append(x)
                x += 1
                break
            rank -= count
            x += 1
    return out


Render = Callable[[int, tuple[int, ...]], tuple[str, tuple[str, ...]]]


@dataclass(frozen=True)
class _Design:
    """A task as a product space: for each label, ``prod(radices)`` distinct items.

    ``render(label, digits)`` turns one point of the space into (prompt, choices); it must be
    injective, so sampling distinct indices gives distinct prompts.
    """

    task: str
    kind: TaskKind
    n_labels: int
    radices: tuple[int, ...]
    render: Render

    @property
    def capacity(self) -> int:
        """The most distinct items with balanced labels."""
        return self.n_labels * math.prod(self.radices)

    def sample(self, n: int, seed: int) -> list[ChoiceItem]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r} items of task {self.task!r} asked for; give an integer n >= 1")
        if n > self.capacity:
            raise ConfigError(
                f"task {self.task!r} can yield at most {self.capacity} distinct items with balanced labels, "
                f"but n={n} were asked for; ask for n <= {self.capacity} or add a user file (load_jsonl)"
            )
        # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
        rng = random.Random(f"headlab.choice:{self.task}:{seed}")
        labels = [i % self.n_labels for i in range(n)]
        rng.shuffle(labels)
        per_label = math.prod(self.radices)
        counts = Counter(labels)
        # range() is sampled without being built, so spaces of millions of items cost nothing.
        pools = {lab: rng.sample(range(per_label), counts[lab]) for lab in range(self.n_labels)}
        items = []
        for lab in labels:
            prompt, choices = self.render(lab, _digits(pools[lab].pop(), self.radices))
            items.append(ChoiceItem(prompt, choices, lab, self.task, self.kind))
        return items


def _common_length(groups: Sequence[Sequence[object]], what: str) -> int:
    """The one length every word list of a task shares (each label draws from a space of one size)."""
    lengths = {len(g) for g in groups}
    if len(lengths) != 1:
        raise ValueError(f"the {what} lists differ in length {sorted(lengths)}; give each the same number")
    return lengths.pop()


def _options(question: str, options: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    lines = [question, *(f"{LETTERS[i]}. {text}" for i, text in enumerate(options)), "Answer:"]
    return "\n".join(lines), tuple(f" {LETTERS[i]}" for i in range(len(options)))


# ---------------------------------------------------------------------------------------- sentiment

# Evaluative adjectives that fit any reviewed thing, and none negated (no "not good").
POSITIVE_ADJECTIVES = (
    "excellent", "wonderful", "superb", "delightful", "fantastic", "great", "lovely", "brilliant",
    "outstanding", "pleasant", "impressive", "enjoyable", "charming", "marvellous", "terrific",
    "splendid", "fabulous", "amazing", "good", "satisfying",
)  # fmt: skip
NEGATIVE_ADJECTIVES = (
    "terrible", "awful", "dreadful", "horrible", "disappointing", "poor", "mediocre", "unpleasant",
    "dull", "lousy", "appalling", "miserable", "shoddy", "frustrating", "annoying", "bad",
    "atrocious", "abysmal", "painful", "sloppy",
)  # fmt: skip
INTENSIFIERS = (
    "",
    "really ",
    "truly ",
    "very ",
    "quite ",
    "genuinely ",
    "simply ",
    "incredibly ",
    "remarkably ",
)
REVIEWED_THINGS = (
    "the food", "the service", "the film", "the hotel room", "the concert", "the new phone", "the staff",
    "the book", "the coffee", "the trip", "the game", "the show", "the restaurant", "the museum tour",
    "the delivery", "the lecture", "the app", "the haircut", "the car", "the course",
)  # fmt: skip
SENTIMENT_TEMPLATES = (
    "{Thing} was {adj}.",
    "I thought {thing} was {adj}.",
    "Overall, {thing} was {adj}.",
    "Honestly, {thing} was {adj}.",
    "We all agreed that {thing} was {adj}.",
    "In my opinion, {thing} was {adj}.",
    "My friends said {thing} was {adj}.",
    "{Thing} turned out to be {adj}.",
)
SENTIMENT_LABELS = (" negative", " positive")


def _render_sentiment(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    t, thing, intens, adj = digits
    words = (NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES)[label]
    noun = REVIEWED_THINGS[thing]
    review = SENTIMENT_TEMPLATES[t].format(
        thing=noun, Thing=noun[0].upper() + noun[1:], adj=INTENSIFIERS[intens] + words[adj]
    )
    prompt = f"Classify the sentiment of the review.\n\nReview: {review}\nSentiment:"
    return prompt, SENTIMENT_LABELS


_SENTIMENT = _Design(
    "sentiment",
    "classification",
    2,
    (
        len(SENTIMENT_TEMPLATES),
        len(REVIEWED_THINGS),
        len(INTENSIFIERS),
        _common_length([NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES], "adjective"),
    ),
    _render_sentiment,
)


def make_sentiment(n: int, seed: int) -> list[ChoiceItem]:
    """Templated one-sentence reviews from a positive/negative lexicon; label `` negative``/`` positive``."""
    return _SENTIMENT.sample(n, seed)


# ---------------------------------------------------------------------------------------- topic

# Per topic: subjects (lower case, capitalised at the start of a sentence) and predicates that fit
# every subject of the topic; the topic is carried by both.
TOPIC_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("the striker", "the goalkeeper", "the home team", "the coach", "the young sprinter",
         "the tennis champion", "the captain", "the visiting side", "the marathon runner", "the boxer"),
        ("won the championship final", "lost the semi-final", "trained all week for the tournament",
         "was injured during the match", "celebrated a record victory", "qualified for the Olympic Games",
         "was cheered by the fans in the stadium", "prepared for the season opener",
         "broke the national record", "finished the season at the top of the league"),
    ),
    "science": (
        ("the physicist", "a team of chemists", "the biologist", "the research laboratory",
         "the astronomer", "a group of geologists", "the university researchers", "the young scientist",
         "the space agency", "the neuroscientist"),
        ("published a study on cell division", "measured the speed of the particles",
         "discovered a new species of bacteria", "observed a distant galaxy through a telescope",
         "tested the hypothesis in a controlled experiment", "analysed the DNA samples",
         "reported the results in a scientific journal", "built a more precise microscope",
         "studied the chemical reaction", "collected data on the magnetic field"),
    ),
    "food": (
        ("the chef", "my grandmother", "the bakery", "the new restaurant", "our neighbour", "the cook",
         "the pastry chef", "the street vendor", "the family", "the café"),
        ("baked a loaf of sourdough bread", "served a spicy tomato soup",
         "roasted a chicken with garlic and herbs", "prepared a bowl of pasta with cheese",
         "made a chocolate cake for dessert", "fried some potatoes in butter",
         "cooked rice with vegetables", "grilled fresh fish with lemon",
         "mixed a salad of lettuce and cucumber", "simmered a pot of bean stew"),
    ),
    "music": (
        ("the pianist", "the band", "the orchestra", "the singer", "the young guitarist", "the choir",
         "the jazz trio", "the composer", "the violinist", "the drummer"),
        ("performed a new song at the concert", "recorded an album in the studio",
         "rehearsed the symphony for hours", "played a slow melody", "toured the country with a new album",
         "tuned the instruments before the show", "practised the scales before the recital",
         "played an encore for the cheering audience", "won a prize for the best album",
         "released a single on the radio"),
    ),
    "politics": (
        ("the prime minister", "the senator", "the opposition party", "the government", "the mayor",
         "the parliament", "the president", "the city council", "the minister of finance",
         "the governing coalition"),
        ("proposed a new tax law", "won the general election", "debated the national budget",
         "announced a referendum on the constitution", "passed a bill on immigration",
         "campaigned for votes before the election", "formed a coalition with the liberals",
         "vetoed the new legislation", "called for early elections",
         "signed a treaty with the neighbouring state"),
    ),
    "travel": (
        ("the tourists", "our family", "the backpacker", "the travel agency", "my cousin",
         "the group of hikers", "the cruise passengers", "the young couple", "the tour guide",
         "the pilgrims"),
        ("booked a flight to Lisbon", "checked into a hotel by the beach",
         "visited the old cathedral and the harbour", "took the night train across the border",
         "packed the suitcases for the holiday", "explored the mountain villages",
         "bought tickets for a boat tour", "rented a car at the airport",
         "went sightseeing in the capital", "stayed at a hostel near the station"),
    ),
}  # fmt: skip
TIME_PHRASES = (
    "last week", "on Monday", "yesterday", "this morning", "last summer", "on Saturday evening",
    "earlier this year", "in the spring", "two days ago", "last night",
)  # fmt: skip
TOPIC_LABELS = tuple(f" {t}" for t in TOPIC_WORDS)


def _render_topic(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    order, subj, pred, when = digits
    subjects, predicates = TOPIC_WORDS[TOPIC_LABELS[label].strip()]
    subject, predicate, time = subjects[subj], predicates[pred], TIME_PHRASES[when]
    if order == 0:
        sentence = f"{subject[0].upper()}{subject[1:]} {predicate} {time}."
    else:
        sentence = f"{time[0].upper()}{time[1:]}, {subject} {predicate}."
    prompt = f"Classify the topic of the sentence.\n\nSentence: {sentence}\nTopic:"
    return prompt, TOPIC_LABELS


_TOPIC = _Design(
    "topic",
    "classification",
    len(TOPIC_WORDS),
    (
        2,
        _common_length([subjects for subjects, _ in TOPIC_WORDS.values()], "topic subject"),
        _common_length([predicates for _, predicates in TOPIC_WORDS.values()], "topic predicate"),
        len(TIME_PHRASES),
    ),
    _render_topic,
)


def make_topic(n: int, seed: int) -> list[ChoiceItem]:
    """A sentence about sports, science, food, music, politics or travel; label the topic word."""
    return _TOPIC.sample(n, seed)


# ---------------------------------------------------------------------------------------- numbers

NUMBER_RANGE = (1, 999)  # inclusive
N_NUMBER_OPTIONS = 2
_N_NUMBERS = NUMBER_RANGE[1] - NUMBER_RANGE[0] + 1


def _render_larger_number(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    rank, *order = digits
    values = [NUMBER_RANGE[0] + v for v in _unrank_combination(rank, _N_NUMBERS, N_NUMBER_OPTIONS)]
    largest, smaller = values[-1], _pick(values[:-1], order)
    options = [*smaller[:label], largest, *smaller[label:]]
    question = "Which number is larger?" if N_NUMBER_OPTIONS == 2 else "Which number is the largest?"
    return _options(question, [str(v) for v in options])


_LARGER_NUMBER = _Design(
    "larger_number",
    "multiple_choice",
    N_NUMBER_OPTIONS,
    (math.comb(_N_NUMBERS, N_NUMBER_OPTIONS), *range(N_NUMBER_OPTIONS - 1, 0, -1)),
    _render_larger_number,
)


def make_larger_number(n: int, seed: int) -> list[ChoiceItem]:
    """Which of two numbers from 1 to 999 is larger; the answer letter's position is balanced."""
    return _LARGER_NUMBER.sample(n, seed)


# ---------------------------------------------------------------------------------------- capitals

# Countries with one undisputed capital, names in ASCII.
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Morocco", "Rabat"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Senegal", "Dakar"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"),
    ("the United States", "Washington"), ("Cuba", "Havana"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Jamaica", "Kingston"),
)  # fmt: skip
CAPITAL_QUESTIONS = ("What is the capital of {country}?", "Which city is the capital of {country}?")
N_CAPITAL_OPTIONS = 4


def _render_capital(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    q, country, *others = digits
    distractors = _pick([i for i in range(len(CAPITALS)) if i != country], others)
    order = [*distractors[:label], country, *distractors[label:]]
    question = CAPITAL_QUESTIONS[q].format(country=CAPITALS[country][0])
    return _options(question, [CAPITALS[i][1] for i in order])


_CAPITAL = _Design(
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
    return _CAPITAL.sample(n, seed)


# ---------------------------------------------------------------------------------------- colours

# Things whose colour is typical; none is named after its colour ("orange", "blueberry").
OBJECT_COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("a tomato", "a strawberry", "a cherry", "a fire engine", "a ruby", "a raspberry",
            "a stop sign", "a ladybird"),
    "yellow": ("a banana", "a lemon", "a sunflower", "a canary", "a school bus", "an egg yolk",
               "a dandelion", "a corn cob"),
    "green": ("a cucumber", "a frog", "a lime", "an emerald", "a lettuce", "a broccoli floret",
              "a blade of grass", "a pea pod"),
    "white": ("a snowflake", "a swan", "a polar bear", "a glass of milk", "a sugar cube",
              "a cotton ball", "a wedding dress", "a snowman"),
    "black": ("a crow", "a raven", "a lump of coal", "a car tyre", "a tuxedo", "a gorilla",
              "a hockey puck", "a panther"),
    "orange": ("a carrot", "a pumpkin", "a tangerine", "a goldfish", "a basketball", "a traffic cone",
               "an apricot", "a mandarin"),
    "brown": ("a chocolate bar", "a coffee bean", "a walnut", "an acorn", "a cinnamon stick",
              "a tree trunk", "a hazelnut", "a grizzly bear"),
}  # fmt: skip
PEOPLE = (
    "Maria", "John", "Aisha", "Tom", "Lena", "Carlos", "Mei", "Omar", "Sophie", "David", "Priya", "Lucas",
    "Hannah", "Kenji", "Fatima", "Peter", "Elena", "Samuel", "Nora", "Ivan",
)  # fmt: skip
SEEING_VERBS = ("saw", "noticed", "looked at", "pointed at", "photographed")
PLACES = (
    "in a photo", "in a magazine", "in a video", "in a picture book", "on a poster", "in a painting",
    "on a website", "on television",
)  # fmt: skip
COLOUR_LABELS = tuple(f" {c}" for c in OBJECT_COLOURS)


def _render_object_colour(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    person, verb, obj, place = digits
    thing = OBJECT_COLOURS[COLOUR_LABELS[label].strip()][obj]
    noun = thing.split(" ", 1)[1]
    prompt = (
        "Name the usual colour of the thing.\n\n"
        f"{PEOPLE[person]} {SEEING_VERBS[verb]} {thing} {PLACES[place]}. "
        f"What colour is the {noun}?\nColour:"
    )
    return prompt, COLOUR_LABELS


_OBJECT_COLOUR = _Design(
    "object_colour",
    "classification",
    len(OBJECT_COLOURS),
    (
        len(PEOPLE),
        len(SEEING_VERBS),
        _common_length(list(OBJECT_COLOURS.values()), "coloured object"),
        len(PLACES),
    ),
    _render_object_colour,
)


def make_object_colour(n: int, seed: int) -> list[ChoiceItem]:
    """A named thing with a typical colour (a banana → `` yellow``), over seven colour words."""
    return _OBJECT_COLOUR.sample(n, seed)


# ---------------------------------------------------------------------------------------- odd one out

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "apricot"),
    "animal": ("dog", "cat", "horse", "rabbit", "tiger", "lion", "sheep", "wolf", "elephant", "mouse"),
    "tool": ("hammer", "wrench", "screwdriver", "trowel", "drill", "chisel", "pliers", "shovel", "axe",
             "rake"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "tram", "motorbike", "van", "tractor",
                "scooter"),
    "instrument": ("piano", "violin", "guitar", "trumpet", "flute", "drum", "cello", "harp", "clarinet",
                   "saxophone"),
    "furniture": ("chair", "table", "sofa", "bed", "wardrobe", "desk", "shelf", "stool", "cupboard",
                  "armchair"),
    "clothing": ("shirt", "jacket", "sock", "trousers", "dress", "coat", "scarf", "skirt", "sweater",
                 "hat"),
    "body part": ("arm", "leg", "elbow", "knee", "shoulder", "finger", "ankle", "wrist", "toe", "nose"),
}  # fmt: skip
N_ODD_OPTIONS = 4
_CATEGORY_NAMES = tuple(CATEGORIES)
_CATEGORY_SIZE = _common_length(list(CATEGORIES.values()), "category")


def _render_odd_one_out(label: int, digits: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
    main, odd, *rest = digits
    main_words = CATEGORIES[_CATEGORY_NAMES[main]]
    odd_category = _pick([i for i in range(len(CATEGORIES)) if i != main], [odd])[0]
    picked = _pick(range(len(main_words)), rest[:-1])
    words = [main_words[i] for i in picked]
    odd_word = CATEGORIES[_CATEGORY_NAMES[odd_category]][rest[-1]]
    return _options("Which word does not belong with the others?", [*words[:label], odd_word, *words[label:]])


_ODD_ONE_OUT = _Design(
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
    return _ODD_ONE_OUT.sample(n, seed)


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: ``generator(n, seed)`` yields up to ``capacity`` distinct items."""

    name: str
    kind: TaskKind
    description: str
    generator: Callable[[int, int], list[ChoiceItem]]
    capacity: int  # most distinct items with balanced labels
    n_choices: int

    @property
    def chance(self) -> float:
        """Accuracy of guessing (labels are balanced)."""
        return 1.0 / self.n_choices


def _spec(design: _Design, generator: Callable[[int, int], list[ChoiceItem]]) -> TaskSpec:
    doc = (generator.__doc__ or "").strip().splitlines()[0]
    return TaskSpec(design.task, design.kind, doc, generator, design.capacity, design.n_labels)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec(_SENTIMENT, make_sentiment),
        _spec(_TOPIC, make_topic),
        _spec(_LARGER_NUMBER, make_larger_number),
        _spec(_CAPITAL, make_capital),
        _spec(_OBJECT_COLOUR, make_object_colour),
        _spec(_ODD_ONE_OUT, make_odd_one_out),
    )
}


def make_task(name: str, n: int, seed: int) -> list[ChoiceItem]:
    """``n`` items of the built-in task ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {name!r}.{hint} Choose one of: {', '.join(TASKS)}")
    return TASKS[name].generator(n, seed)


# ---------------------------------------------------------------------------------------- user files


def load_jsonl(path: str | Path, *, task: str | None = None) -> list[ChoiceItem]:
    """Items from a JSONL file: one ``{"prompt": str, "choices": [str, ...], "label": int}`` per line.

    Optional keys: ``"task"`` (default: ``task`` or the file's stem) and ``"kind"``
    (``"classification"`` or ``"multiple_choice"``; default: multiple choice when the choices are
    the letters `` A``, `` B``, … in order, else classification). Other keys are ignored; blank
    lines are skipped. Every line is checked before anything is returned, and one error lists the
    bad lines (``file:line: problem; fix``), so a file is loaded whole or not at all.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; give the path of a JSONL file of choice items")
    default_task = task or file.stem
    items: list[ChoiceItem] = []
    problems: list[str] = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem, item = _parse_line(line, default_task)
            if problem:
                problems.append(f"{file}:{lineno}: {problem}")
            elif item is not None:
                items.append(item)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(
            f"{len(problems)} bad line(s) in {file}; each line must be a JSON object "
            f'{{"prompt": str, "choices": [str, ...], "label": int}}:\n  {shown}{more}'
        )
    if not items:
        raise ConfigError(f"{file} has no items; write one JSON object per line")
    return items


def _parse_line(line: str, default_task: str) -> tuple[str | None, ChoiceItem | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line", None
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}; write one object per line", None
    missing = [key for key in ("prompt", "choices", "label") if key not in record]
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}; add them", None
    choices = record["choices"]
    kind = record.get("kind")
    if kind is None and isinstance(choices, list):
        letters = [f" {LETTERS[i]}" for i in range(min(len(choices), len(LETTERS)))]
        kind = "multiple_choice" if choices == letters else "classification"
    item_task = record.get("task", default_task)
    if not isinstance(item_task, str) or not item_task:
        return "'task' must be a non-empty string; fix or drop it", None
    problem = _item_problem(record["prompt"], choices, record["label"], kind)
    if problem:
        return problem, None
    return None, ChoiceItem(
        record["prompt"], tuple(choices), record["label"], item_task, cast(TaskKind, kind)
    )


def write_jsonl(items: Sequence[ChoiceItem], path: str | Path) -> Path:
    """Write items in the format :func:`load_jsonl` reads (round trip)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    return file


# ---------------------------------------------------------------------------------------- splits


def split(
    items: Sequence[ChoiceItem], calibration: float, seed: int
) -> tuple[list[ChoiceItem], list[ChoiceItem]]:
    """A seeded split into (calibration items, held-out items), disjoint and together complete.

    Stratified by task: about ``calibration`` of each task's items go to the calibration part, so a
    mixture keeps its proportions in both (ACT filters heads on one part and reports the other).
    Items keep their original order within each part.
    """
    if not 0.0 < calibration < 1.0:
        raise ConfigError(f"calibration={calibration!r}; give the fraction for calibration, in (0, 1)")
    if len(items) < 2:
        raise ConfigError(f"cannot split {len(items)} item(s); give at least two")
    rng = random.Random(f"headlab.choice.split:{seed}")
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    chosen: set[int] = set()
    for task in sorted(by_task):
        indices = by_task[task]
        rng.shuffle(indices)
        chosen.update(indices[: round(calibration * len(indices))])
    if not chosen or len(chosen) == len(items):
        raise ConfigError(
            f"calibration={calibration} of {len(items)} items leaves one part empty; "
            "use more items or a fraction further from 0 and 1"
        )
    calib = [item for i, item in enumerate(items) if i in chosen]
    held = [item for i, item in enumerate(items) if i not in chosen]
    return calib, held


# ---------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Row:
    """One sequence to run and the log-probabilities to read from it."""

    item: int
    context: list[int]  # prompt tokens, then some choice tokens; no BOS
    reads: list[tuple[int, int, int]]  # (choice, context position whose next-token distribution, token)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_token_ids(tokenizer: Any, prompt: str, choice: str) -> list[int]:
    """The tokens ``choice`` adds after ``prompt`` (tail of the joint tokenization; see module doc)."""
    prompt_ids = _encode(tokenizer, prompt)
    joint = _encode(tokenizer, prompt + choice)
    if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids) :]
    return _encode(tokenizer, choice)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _plan(tokenizer: Any, item: ChoiceItem, choice_token: ChoiceToken, index: int) -> list[_Row]:
    prompt_ids = _encode(tokenizer, item.prompt)
    end = len(prompt_ids) - 1  # the final prompt position
    tokens = [choice_token_ids(tokenizer, item.prompt, c) for c in item.choices]
    if any(not t for t in tokens):
        raise ConfigError(f"item {index}: a choice of {item.choices!r} has no tokens; give non-empty choices")
    if choice_token == "last":
        targets = [t[-1] for t in tokens]
        if len(set(targets)) != len(targets):
            raise ConfigError(
                f"item {index} ({item.task}): choices {item.choices!r} end in the same token, so "
                "choice_token='last' cannot tell them apart; use choice_token='first'"
            )
        return [_Row(index, prompt_ids, [(c, end, t) for c, t in enumerate(targets)])]
    # 'first': each choice up to and including the first token that no other choice shares there.
    rows: dict[tuple[int, ...], _Row] = {}
    for c, own in enumerate(tokens):
        depth = 1 + max(_common_prefix(own, other) for k, other in enumerate(tokens) if k != c)
        if depth > len(own):
            raise ConfigError(
                f"item {index} ({item.task}): choice {item.choices[c]!r} is a token prefix of another of "
                f"{item.choices!r}, so the choices cannot be told apart by their probabilities; "
                "use choices where none is the beginning of another"
            )
        head = tuple(own[: depth - 1])
        row = rows.setdefault(head, _Row(index, prompt_ids + list(head), []))
        row.reads.extend((c, end + t, own[t]) for t in range(depth))
    return list(rows.values())


@torch.no_grad()
def choice_logprobs(
    model: LoadedModel,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    choice_token: ChoiceToken = "first",
    progress: bool = True,
) -> np.ndarray:
    """Log-probability of each item's choices after its prompt: ``[n_items, max_choices]``.

    With one-token choices (all built-in tasks on SmolLM2 and Gemma 3) this is the log-softmax at
    the final prompt position read at each choice's token, one forward pass per item. Entries past
    an item's own number of choices are NaN. See the module docstring for several-token choices and
    ``choice_token``. Runs through ``model.bridge`` (hooks and interventions active around the call
    apply), ``batch_size`` sequences at a time, left-padded with the model's BOS policy, grouped by
    length to pad little; an item's numbers do not depend on its batch.
    """
    if model.bridge is None:
        raise ConfigError(f"{model.name} is not a language model; choice tasks need one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; give an integer >= 1")
    if choice_token not in get_args(ChoiceToken):
        raise ConfigError(f"choice_token={choice_token!r}; choose 'first' or 'last'")
    if not items:
        raise ConfigError("no items to score; give at least one")
    rows = [row for i, item in enumerate(items) for row in _plan(model.tokenizer, item, choice_token, i)]
    width = max(len(item.choices) for item in items)
    out = np.full((len(items), width), np.nan, dtype=np.float64)
    for i, item in enumerate(items):
        out[i, : len(item.choices)] = 0.0  # summed over the read tokens below
    rows.sort(key=lambda r: len(r.context))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="choice scoring", unit="seq", disable=not progress, leave=False)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = model.batch_from_ids([r.context for r in chunk])
            position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
            logits = model.bridge(
                batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
            )
            T = logits.shape[1]
            # Left padding: context position p of a row of length L sits in column T - L + p.
            where = [(b, T - len(r.context) + pos) for b, r in enumerate(chunk) for _, pos, _ in r.reads]
            picked = logits[[b for b, _ in where], [col for _, col in where]]
            logp = torch.log_softmax(picked.float(), dim=-1).cpu()
            k = 0
            for r in chunk:
                for c, _, token in r.reads:
                    out[r.item, c] += float(logp[k, token])
                    k += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def predictions(logprobs: np.ndarray) -> np.ndarray:
    """Index of the best-scored choice per item (NaN entries, i.e. missing choices, never win)."""
    return np.where(np.isnan(logprobs), -np.inf, logprobs).argmax(axis=1)


# ---------------------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class Accuracy:
    """Fraction correct with a percentile-bootstrap interval (``level`` 0.95 by default)."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def accuracy(correct: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Accuracy:
    """Accuracy of 0/1 outcomes with a percentile bootstrap interval.

    Resampling ``n`` outcomes with replacement and counting the correct ones is exactly a draw
    from Binomial(n, p̂), so the ``n_boot`` bootstrap accuracies are drawn that way (same
    distribution as index resampling, no ``n_boot × n`` array). The interval is the
    ``(1 ± level) / 2`` percentiles of those accuracies.
    """
    values = np.asarray(correct)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"correct must be a non-empty 1-d array of 0/1 outcomes, got shape {values.shape}")
    if not np.isin(values, (0, 1)).all():
        raise ConfigError("correct must hold only 0/1 (or False/True) outcomes")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ConfigError(f"n_boot={n_boot}, level={level}; give n_boot >= 1 and a level in (0, 1)")
    n = int(values.size)
    value = float(values.mean())
    draws = np.random.default_rng(seed).binomial(n, value, size=n_boot) / n
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    # Percentiles of a discrete distribution can miss the estimate only by rounding: keep it inside.
    return Accuracy(value, float(min(low, value)), float(max(high, value)), n)


def evaluate(
    model: LoadedModel,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    choice_token: ChoiceToken = "first",
    progress: bool = True,
) -> pd.DataFrame:
    """Score ``items``: one row per item with task, kind, n_choices, label, predicted, correct, margin.

    ``margin`` is the label's log-probability minus that of the best other choice (> 0 when
    correct), the graded signal behind accuracy.
    """
    logp = choice_logprobs(model, items, batch_size=batch_size, choice_token=choice_token, progress=progress)
    predicted = predictions(logp)
    labels = np.array([item.label for item in items])
    rows = np.arange(len(items))
    label_logp = logp[rows, labels]
    others = logp.copy()
    others[rows, labels] = np.nan
    best_other = np.nanmax(others, axis=1)
    return pd.DataFrame(
        {
            "task": [item.task for item in items],
            "kind": [item.kind for item in items],
            "n_choices": [len(item.choices) for item in items],
            "label": labels,
            "predicted": predicted,
            "correct": predicted == labels,
            "margin": label_logp - best_other,
        }
    )


def summarise(frame: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Accuracy per task of an :func:`evaluate` frame, with 95% bootstrap interval and chance level."""
    rows = []
    for task, group in frame.groupby("task", sort=True):
        acc = accuracy(group["correct"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(
            {
                "task": task,
                "n": acc.n,
                "accuracy": acc.value,
                "low": acc.low,
                "high": acc.high,
                "chance": float((1.0 / group["n_choices"]).mean()),
                "mean_margin": float(group["margin"].mean()),
            }
        )
    return pd.DataFrame(rows)
