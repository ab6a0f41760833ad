"""Zero-shot choice tasks: seeded offline generators, a loader for user files, and scoring.

Six built-in tasks (:data:`TASKS`), each a seeded product space of templates and word lists with
balanced labels and at most ``capacity`` distinct items:

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

Real datasets come in through :func:`load_jsonl`. :func:`choice_logprobs` reads each choice's
log-probability at the final prompt position through ``model.bridge`` (hooks and pattern edits act);
:func:`evaluate` and :func:`summarise` give per-item results and accuracy with bootstrap intervals.

See docs/analyses/act.md (tasks, prompts and the scoring rule).
"""

from __future__ import annotations

from analyses.tasks.choice.accuracy import (
    Accuracy,
    accuracy,
    evaluate,
    summarise,
)
from analyses.tasks.choice.classification import (
    COLOUR_LABELS,
    INTENSIFIERS,
    NEGATIVE_ADJECTIVES,
    OBJECT_COLOURS,
    PEOPLE,
    PLACES,
    POSITIVE_ADJECTIVES,
    REVIEWED_THINGS,
    SEEING_VERBS,
    SENTIMENT_LABELS,
    SENTIMENT_TEMPLATES,
    TIME_PHRASES,
    TOPIC_LABELS,
    TOPIC_WORDS,
    make_object_colour,
    make_sentiment,
    make_topic,
)
from analyses.tasks.choice.files import (
    load_jsonl,
    write_jsonl,
)
from analyses.tasks.choice.items import (
    LETTERS,
    ChoiceItem,
    ChoiceToken,
    TaskKind,
)
from analyses.tasks.choice.multiple_choice import (
    CAPITAL_QUESTIONS,
    CAPITALS,
    CATEGORIES,
    N_CAPITAL_OPTIONS,
    N_NUMBER_OPTIONS,
    N_ODD_OPTIONS,
    NUMBER_RANGE,
    make_capital,
    make_larger_number,
    make_odd_one_out,
)
from analyses.tasks.choice.scoring import _plan as _plan  # the scoring plan, read by analyses.act
from analyses.tasks.choice.scoring import (
    choice_logprobs,
    choice_token_ids,
    predictions,
)
from analyses.tasks.choice.tasks import (
    TASKS,
    TaskSpec,
    make_task,
    split,
)

__all__ = [
    "CAPITALS",
    "CAPITAL_QUESTIONS",
    "CATEGORIES",
    "COLOUR_LABELS",
    "INTENSIFIERS",
    "LETTERS",
    "NEGATIVE_ADJECTIVES",
    "NUMBER_RANGE",
    "N_CAPITAL_OPTIONS",
    "N_NUMBER_OPTIONS",
    "N_ODD_OPTIONS",
    "OBJECT_COLOURS",
    "PEOPLE",
    "PLACES",
    "POSITIVE_ADJECTIVES",
    "REVIEWED_THINGS",
    "SEEING_VERBS",
    "SENTIMENT_LABELS",
    "SENTIMENT_TEMPLATES",
    "TASKS",
    "TIME_PHRASES",
    "TOPIC_LABELS",
    "TOPIC_WORDS",
    "Accuracy",
    "ChoiceItem",
    "ChoiceToken",
    "TaskKind",
    "TaskSpec",
    "accuracy",
    "choice_logprobs",
    "choice_token_ids",
    "evaluate",
    "load_jsonl",
    "make_capital",
    "make_larger_number",
    "make_object_colour",
    "make_odd_one_out",
    "make_sentiment",
    "make_task",
    "make_topic",
    "predictions",
    "split",
    "summarise",
    "write_jsonl",
]
