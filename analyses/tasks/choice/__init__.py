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
