"""The classification tasks: sentiment, topic and object colour (word lists, templates, designs)."""

from __future__ import annotations

from analyses.tasks.choice.design import Design, common_length
from analyses.tasks.choice.items import ChoiceItem

# ---------------------------------------------------------------------------------------- sentiment

# Evaluative adjectives that fit any reviewed thing, and none negated (no "not good").
POSITIVE_ADJECTIVES = (
    "excellent",
    "wonderful",
    "superb",
    "delightful",
    "fantastic",
    "great",
    "lovely",
    "brilliant",
    "outstanding",
    "pleasant",
    "impressive",
    "enjoyable",
    "charming",
    "marvellous",
    "terrific",
    "splendid",
    "fabulous",
    "amazing",
    "good",
    "satisfying",
)
NEGATIVE_ADJECTIVES = (
    "terrible",
    "awful",
    "dreadful",
    "horrible",
    "disappointing",
    "poor",
    "mediocre",
    "unpleasant",
    "dull",
    "lousy",
    "appalling",
    "miserable",
    "shoddy",
    "frustrating",
    "annoying",
    "bad",
    "atrocious",
    "abysmal",
    "painful",
    "sloppy",
)
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
    "the food",
    "the service",
    "the film",
    "the hotel room",
    "the concert",
    "the new phone",
    "the staff",
    "the book",
    "the coffee",
    "the trip",
    "the game",
    "the show",
    "the restaurant",
    "the museum tour",
    "the delivery",
    "the lecture",
    "the app",
    "the haircut",
    "the car",
    "the course",
)
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


SENTIMENT_DESIGN = Design(
    "sentiment",
    "classification",
    2,
    (
        len(SENTIMENT_TEMPLATES),
        len(REVIEWED_THINGS),
        len(INTENSIFIERS),
        common_length([NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES], "adjective"),
    ),
    _render_sentiment,
)


def make_sentiment(n: int, seed: int) -> list[ChoiceItem]:
    """Templated one-sentence reviews from a positive/negative lexicon; label `` negative``/`` positive``."""
    return SENTIMENT_DESIGN.sample(n, seed)


# ---------------------------------------------------------------------------------------- topic

# Per topic: subjects (lower case, capitalised at the start of a sentence) and predicates that fit
# every subject of the topic; the topic is carried by both.
TOPIC_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        (
            "the striker",
            "the goalkeeper",
            "the home team",
            "the coach",
            "the young sprinter",
            "the tennis champion",
            "the captain",
            "the visiting side",
            "the marathon runner",
            "the boxer",
        ),
        (
            "won the championship final",
            "lost the semi-final",
            "trained all week for the tournament",
            "was injured during the match",
            "celebrated a record victory",
            "qualified for the Olympic Games",
            "was cheered by the fans in the stadium",
            "prepared for the season opener",
            "broke the national record",
            "finished the season at the top of the league",
        ),
    ),
    "science": (
        (
            "the physicist",
            "a team of chemists",
            "the biologist",
            "the research laboratory",
            "the astronomer",
            "a group of geologists",
            "the university researchers",
            "the young scientist",
            "the space agency",
            "the neuroscientist",
        ),
        (
            "published a study on cell division",
            "measured the speed of the particles",
            "discovered a new species of bacteria",
            "observed a distant galaxy through a telescope",
            "tested the hypothesis in a controlled experiment",
            "analysed the DNA samples",
            "reported the results in a scientific journal",
            "built a more precise microscope",
            "studied the chemical reaction",
            "collected data on the magnetic field",
        ),
    ),
    "food": (
        (
            "the chef",
            "my grandmother",
            "the bakery",
            "the new restaurant",
            "our neighbour",
            "the cook",
            "the pastry chef",
            "the street vendor",
            "the family",
            "the café",
        ),
        (
            "baked a loaf of sourdough bread",
            "served a spicy tomato soup",
            "roasted a chicken with garlic and herbs",
            "prepared a bowl of pasta with cheese",
            "made a chocolate cake for dessert",
            "fried some potatoes in butter",
            "cooked rice with vegetables",
            "grilled fresh fish with lemon",
            "mixed a salad of lettuce and cucumber",
            "simmered a pot of bean stew",
        ),
    ),
    "music": (
        (
            "the pianist",
            "the band",
            "the orchestra",
            "the singer",
            "the young guitarist",
            "the choir",
            "the jazz trio",
            "the composer",
            "the violinist",
            "the drummer",
        ),
        (
            "performed a new song at the concert",
            "recorded an album in the studio",
            "rehearsed the symphony for hours",
            "played a slow melody",
            "toured the country with a new album",
            "tuned the instruments before the show",
            "practised the scales before the recital",
            "played an encore for the cheering audience",
            "won a prize for the best album",
            "released a single on the radio",
        ),
    ),
    "politics": (
        (
            "the prime minister",
            "the senator",
            "the opposition party",
            "the government",
            "the mayor",
            "the parliament",
            "the president",
            "the city council",
            "the minister of finance",
            "the governing coalition",
        ),
        (
            "proposed a new tax law",
            "won the general election",
            "debated the national budget",
            "announced a referendum on the constitution",
            "passed a bill on immigration",
            "campaigned for votes before the election",
            "formed a coalition with the liberals",
            "vetoed the new legislation",
            "called for early elections",
            "signed a treaty with the neighbouring state",
        ),
    ),
    "travel": (
        (
            "the tourists",
            "our family",
            "the backpacker",
            "the travel agency",
            "my cousin",
            "the group of hikers",
            "the cruise passengers",
            "the young couple",
            "the tour guide",
            "the pilgrims",
        ),
        (
            "booked a flight to Lisbon",
            "checked into a hotel by the beach",
            "visited the old cathedral and the harbour",
            "took the night train across the border",
            "packed the suitcases for the holiday",
            "explored the mountain villages",
            "bought tickets for a boat tour",
            "rented a car at the airport",
            "went sightseeing in the capital",
            "stayed at a hostel near the station",
        ),
    ),
}
TIME_PHRASES = (
    "last week",
    "on Monday",
    "yesterday",
    "this morning",
    "last summer",
    "on Saturday evening",
    "earlier this year",
    "in the spring",
    "two days ago",
    "last night",
)
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


TOPIC_DESIGN = Design(
    "topic",
    "classification",
    len(TOPIC_WORDS),
    (
        2,
        common_length([subjects for subjects, _ in TOPIC_WORDS.values()], "topic subject"),
        common_length([predicates for _, predicates in TOPIC_WORDS.values()], "topic predicate"),
        len(TIME_PHRASES),
    ),
    _render_topic,
)


def make_topic(n: int, seed: int) -> list[ChoiceItem]:
    """A sentence about sports, science, food, music, politics or travel; label the topic word."""
    return TOPIC_DESIGN.sample(n, seed)


# ---------------------------------------------------------------------------------------- colours

# Things whose colour is typical; none is named after its colour ("orange", "blueberry").
OBJECT_COLOURS: dict[str, tuple[str, ...]] = {
    "red": (
        "a tomato",
        "a strawberry",
        "a cherry",
        "a fire engine",
        "a ruby",
        "a raspberry",
        "a stop sign",
        "a ladybird",
    ),
    "yellow": (
        "a banana",
        "a lemon",
        "a sunflower",
        "a canary",
        "a school bus",
        "an egg yolk",
        "a dandelion",
        "a corn cob",
    ),
    "green": (
        "a cucumber",
        "a frog",
        "a lime",
        "an emerald",
        "a lettuce",
        "a broccoli floret",
        "a blade of grass",
        "a pea pod",
    ),
    "white": (
        "a snowflake",
        "a swan",
        "a polar bear",
        "a glass of milk",
        "a sugar cube",
        "a cotton ball",
        "a wedding dress",
        "a snowman",
    ),
    "black": (
        "a crow",
        "a raven",
        "a lump of coal",
        "a car tyre",
        "a tuxedo",
        "a gorilla",
        "a hockey puck",
        "a panther",
    ),
    "orange": (
        "a carrot",
        "a pumpkin",
        "a tangerine",
        "a goldfish",
        "a basketball",
        "a traffic cone",
        "an apricot",
        "a mandarin",
    ),
    "brown": (
        "a chocolate bar",
        "a coffee bean",
        "a walnut",
        "an acorn",
        "a cinnamon stick",
        "a tree trunk",
        "a hazelnut",
        "a grizzly bear",
    ),
}
PEOPLE = (
    "Maria",
    "John",
    "Aisha",
    "Tom",
    "Lena",
    "Carlos",
    "Mei",
    "Omar",
    "Sophie",
    "David",
    "Priya",
    "Lucas",
    "Hannah",
    "Kenji",
    "Fatima",
    "Peter",
    "Elena",
    "Samuel",
    "Nora",
    "Ivan",
)
SEEING_VERBS = ("saw", "noticed", "looked at", "pointed at", "photographed")
PLACES = (
    "in a photo",
    "in a magazine",
    "in a video",
    "in a picture book",
    "on a poster",
    "in a painting",
    "on a website",
    "on television",
)
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


OBJECT_COLOUR_DESIGN = Design(
    "object_colour",
    "classification",
    len(OBJECT_COLOURS),
    (
        len(PEOPLE),
        len(SEEING_VERBS),
        common_length(list(OBJECT_COLOURS.values()), "coloured object"),
        len(PLACES),
    ),
    _render_object_colour,
)


def make_object_colour(n: int, seed: int) -> list[ChoiceItem]:
    """A named thing with a typical colour (a banana → `` yellow``), over seven colour words."""
    return OBJECT_COLOUR_DESIGN.sample(n, seed)
