"""A learnable synthetic preference set: polite answers beat rude ones.

Used by tests and by quick demos of the reward-model, DPO and KTO stages when no
real preference data is at hand. Every answer is assembled from the same parts:

    [opener] fact [interjection] fact ... [closer]

The facts are neutral, on-topic sentences shared by both sides of a pair, so the
only reliable signal is politeness: the chosen answer uses polite openers, closers
and asides; the rejected answer swaps at least one of them for an insult, a
dismissal or profanity (and now and then answers a different question). Fact
counts are drawn independently for each side and the rude and polite templates
have similar lengths, so a model cannot win by preferring the longer answer, and
slot-filling (topic phrase, fact choice, order) makes thousands of distinct pairs,
so it cannot win by memorising strings either.

The rude templates contain real profanity on purpose: this is the kind of output
the detoxification demo trains the policy away from.

>>> pairs = polite_vs_rude_pairs(3, seed=0)
>>> sorted(pairs[0])
['chosen', 'prompt', 'rejected']
>>> pairs == polite_vs_rude_pairs(3, seed=0)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import parse_qsl

from alignkit.data.io import Record
from alignkit.errors import AlignkitError

__all__ = ["kto_records", "polite_vs_rude_pairs", "ranking_records", "synthetic_records"]


@dataclass(frozen=True)
class _Topic:
    thing: str  # a noun phrase that fills "{thing}" in the templates
    prompts: tuple[str, ...]
    facts: tuple[str, ...]


_TOPICS = (
    _Topic("cooking pasta",
           ("How do I cook pasta so it isn't mushy?", "What's the right way to boil spaghetti?"),
           ("Use a large pot of well-salted water and wait until it boils hard before the pasta goes in.",
            "Stir during the first minute so the pieces do not stick together.",
            "Start tasting a minute or two before the packet time and drain it while it still has a little bite.",
            "Keep a cup of the cooking water; it helps the sauce cling to the pasta.")),
    _Topic("asking for time off",
           ("How should I ask my manager for a day off?", "Can you help me write an email requesting leave?"),
           ("Keep the email short and name the exact date you want off.",
            "Mention how your work will be covered while you are away.",
            "Send the request as early as you can so your manager has time to plan.",
            "A short thank-you at the end keeps the tone friendly.")),
    _Topic("photosynthesis",
           ("What is photosynthesis?", "Can you explain how plants make their food?"),
           ("Plants use sunlight to turn water and carbon dioxide into sugar.",
            "The green pigment chlorophyll captures the light energy.",
            "Oxygen is released as a by-product, and that is the oxygen we breathe.",
            "The plant stores the sugar or uses it to grow.")),
    _Topic("reversing a string",
           ("How do I reverse a string in Python?", "What's the easiest way to flip a string backwards in Python?"),
           ("You can use slicing: text[::-1] returns the string reversed.",
            "Another option is ''.join(reversed(text)).",
            "Both leave the original string unchanged, because Python strings are immutable.")),
    _Topic("sleep",
           ("How can I fall asleep faster?", "Do you have any tips for better sleep?"),
           ("Go to bed and get up at the same time every day, even on weekends.",
            "Put screens away for half an hour before bed.",
            "Keep the bedroom cool, dark and quiet.",
            "Avoid coffee in the late afternoon and evening.")),
    _Topic("saving on groceries",
           ("How can I save money on groceries?", "What are some ways to spend less on food each month?"),
           ("Plan your meals for the week and shop with a list.",
            "Try store brands; they are often just as good.",
            "Cook larger batches and freeze portions for busy days.",
            "Check what is already in the fridge before you go shopping.")),
    _Topic("job interviews",
           ("How do I prepare for a job interview?", "I have an interview tomorrow. What should I do to get ready?"),
           ("Read about the company and think about why you want to work there.",
            "Practise answering common questions out loud.",
            "Prepare two or three questions to ask the interviewer.",
            "Plan your route so that you arrive ten minutes early.")),
    _Topic("the area of a circle",
           ("How do I find the area of a circle?", "What's the formula for the area of a circle?"),
           ("The area is pi times the radius squared.",
            "For a radius of 3 cm the area is about 28.3 square centimetres.",
            "If you only know the diameter, halve it first to get the radius.")),
    _Topic("the seasons",
           ("Why do we have seasons?", "What causes summer and winter?"),
           ("Earth's axis is tilted by about 23 degrees.",
            "When your hemisphere leans toward the Sun, days are longer and sunlight arrives more directly, so it is summer.",
            "It is not because Earth gets closer to the Sun; that distance changes very little.")),
    _Topic("packing for the mountains",
           ("What should I pack for a weekend in the mountains?", "What do I need for a short hiking trip?"),
           ("Bring layers, because mountain weather changes quickly.",
            "A waterproof jacket and comfortable, broken-in shoes are essential.",
            "Pack water, snacks, sunscreen and a small first-aid kit.",
            "Tell someone your route before you set out.")),
    _Topic("watering houseplants",
           ("How often should I water my houseplants?", "Why do my indoor plants keep dying?"),
           ("Most houseplants like to dry out a little between waterings.",
            "Push a finger into the soil; if the top few centimetres are dry, it is time to water.",
            "Make sure the pot has drainage holes so the roots do not rot.",
            "Move the plant closer to a window if its leaves look pale.")),
    _Topic("public speaking",
           ("How can I get better at public speaking?", "I get nervous giving presentations. Any advice?"),
           ("Practise your talk out loud several times, ideally in front of a friend.",
            "Slow down and pause; silence feels longer to you than to the audience.",
            "Look at a few friendly faces in the room.",
            "Open with a short story or a question to settle your nerves.")),
    _Topic("percentages",
           ("How do I work out 15% of 80?", "What's 15 percent of 80?"),
           ("Turn the percentage into a decimal and multiply: 0.15 times 80 is 12.",
            "A quick trick is to find 10% first, which is 8, then add half of that again.",
            "So 15% of 80 is 12.")),
    _Topic("git commits",
           ("What does git commit do?", "Can you explain what a commit is in git?"),
           ("A commit saves a snapshot of the changes you have staged.",
            "You stage changes with git add and then record them with git commit.",
            "Each commit has a message that explains what changed and why.",
            "Commits let you go back to earlier versions of your project.")),
    _Topic("learning a language",
           ("What's a good way to start learning Spanish?", "How do I learn a new language as an adult?"),
           ("Practise a little every day rather than a lot once a week.",
            "Learn the most common words and phrases first.",
            "Listen to podcasts or music in the language to train your ear.",
            "Find a conversation partner, even online, and start speaking early.")),
    _Topic("adopting a dog",
           ("What should I think about before adopting a dog?", "Is adopting a dog a good idea for me?"),
           ("Think about how much time you have for walks, training and play.",
            "Consider the costs of food, vet visits and insurance.",
            "Choose a size and energy level that fit your home.",
            "Visit a shelter and ask the staff about each dog's temperament.")),
    _Topic("exam stress",
           ("How can I deal with stress before an exam?", "I'm anxious about my test next week. What can I do?"),
           ("Break your revision into short sessions with breaks in between.",
            "Sleep well the nights before; a tired brain remembers less.",
            "Try slow breathing: in for four counts, out for six.",
            "Do a practice paper under timed conditions so the real one feels familiar.")),
    _Topic("rainbows",
           ("How does a rainbow form?", "Why do rainbows appear after rain?"),
           ("Sunlight enters raindrops and bends, splitting into its colours.",
            "The light reflects off the back of each drop and leaves at an angle.",
            "You see a rainbow when the Sun is behind you and the rain is in front of you.")),
    _Topic("budgeting",
           ("How do I make a monthly budget?", "Can you help me start budgeting?"),
           ("Write down your monthly income after tax.",
            "List fixed costs like rent and bills, then variable costs like food.",
            "Set aside a fixed amount for savings as soon as you are paid.",
            "Review the month at the end and adjust the numbers.")),
    _Topic("banana bread",
           ("How do I make banana bread?", "Do you have a simple banana bread recipe?"),
           ("Mash three ripe bananas and mix them with melted butter, sugar and an egg.",
            "Stir in flour, a teaspoon of baking soda and a pinch of salt.",
            "Bake it in a loaf tin at 175 degrees Celsius for about an hour.",
            "It is done when a skewer comes out clean.")),
    _Topic("thank-you notes",
           ("How do I write a thank-you note to my neighbour?", "What should I say in a thank-you card?"),
           ("Mention exactly what they did, for example watering your plants.",
            "Say how it helped you.",
            "Keep it short and warm, and sign it by hand.")),
    _Topic("jet lag",
           ("How can I avoid jet lag?", "Any tips for jet lag after a long flight?"),
           ("Shift your bedtime by an hour a day before you travel.",
            "Get daylight in the morning once you arrive.",
            "Drink plenty of water and go easy on alcohol during the flight.",
            "Try to stay awake until the local bedtime on the first day.")),
    _Topic("for loops",
           ("What does a for loop do?", "Can you explain loops in programming?"),
           ("A for loop repeats a block of code once for each item in a sequence.",
            "In Python, for n in range(3): print(n) prints 0, 1 and 2.",
            "Loops save you from writing the same line many times.")),
    _Topic("making friends",
           ("How do I make friends in a new city?", "I just moved and don't know anyone. What should I do?"),
           ("Join a club or a class around something you enjoy.",
            "Say yes to invitations, even small ones.",
            "Volunteering is a good way to meet kind people.",
            "Follow up: suggest a coffee after you meet someone you like.")),
    _Topic("posture at a desk",
           ("How can I improve my posture at my desk?", "My back hurts from sitting all day. What helps?"),
           ("Set the top of your screen at about eye level.",
            "Keep your feet flat on the floor and your lower back supported.",
            "Stand up and stretch for a minute every half hour.",
            "A short walk at lunch helps your back more than you might expect.")),
    _Topic("inflation",
           ("What is inflation?", "Why do prices keep going up?"),
           ("Inflation is the general rise in prices over time.",
            "When prices rise, each unit of money buys a little less.",
            "Central banks often raise interest rates to slow it down.",
            "A small, steady rate of inflation is considered normal.")),
    _Topic("a cat scratching furniture",
           ("How do I stop my cat scratching the sofa?", "My cat is ruining the furniture. Can you help?"),
           ("Give your cat a sturdy scratching post right next to the sofa.",
            "Reward it with a treat when it uses the post.",
            "Cover the sofa's corners with a throw for a few weeks.",
            "Trim its claws regularly.")),
    _Topic("solving equations",
           ("How do I solve 3x + 5 = 20?", "Can you show me how to solve for x in 3x + 5 = 20?"),
           ("Subtract 5 from both sides to get 3x = 15.",
            "Then divide both sides by 3, so x = 5.",
            "You can check it: 3 times 5 plus 5 is 20.")),
    _Topic("procrastination",
           ("How do I stop procrastinating?", "I keep putting off my homework. Any tips?"),
           ("Start with just five minutes; getting started is the hardest part.",
            "Break the task into small, concrete steps.",
            "Put your phone in another room while you work.",
            "Reward yourself when you finish a block of work.")),
    _Topic("weather and climate",
           ("What's the difference between weather and climate?", "Are weather and climate the same thing?"),
           ("Weather is what happens in the sky over hours or days.",
            "Climate is the average pattern of weather over many years.",
            "One cold day tells you very little about the climate.")),
    _Topic("cast iron pans",
           ("How do I clean a cast iron pan?", "What's the right way to look after a cast iron skillet?"),
           ("Rinse it with hot water and scrub it with a brush while it is still warm.",
            "Dry it completely on the stove so it does not rust.",
            "Rub in a thin layer of oil before you put it away.",
            "Avoid leaving it to soak in water.")),
    _Topic("running for beginners",
           ("How do I start running?", "What's a good plan for a beginner runner?"),
           ("Start with intervals: one minute of running, two minutes of walking.",
            "Run three times a week with a rest day in between.",
            "Go slowly enough that you could still hold a conversation.",
            "Good shoes make a big difference.")),
    _Topic("vaccines",
           ("How do vaccines work?", "What does a vaccine do in the body?"),
           ("A vaccine shows your immune system a harmless piece or version of a germ.",
            "Your body learns to make antibodies against it.",
            "If you meet the real germ later, your immune system recognises it and reacts faster.")),
    _Topic("asking for a raise",
           ("How should I ask for a raise?", "What's the best way to negotiate a salary increase?"),
           ("Collect examples of your results and any extra responsibilities.",
            "Look up typical pay for your role so you can name a fair number.",
            "Ask for a meeting rather than bringing it up in passing.",
            "Stay calm, and if the answer is no, ask what you would need to do to get there.")),
)

_POLITE_OPENERS = (
    "Great question!",
    "Happy to help with {thing}.",
    "Sure, here is what I would suggest.",
    "Thanks for asking about {thing}.",
    "Of course! Here are a few pointers.",
    "Good idea to ask about {thing}.",
    "I'd be glad to help.",
    "That's a common question, and a good one.",
    "Absolutely, let me walk you through it.",
    "No problem at all.",
    "Here's a friendly overview of {thing}.",
    "Nice one, {thing} is easier than it looks.",
    "Certainly. Here is a short answer.",
    "Thanks for the question!",
    "Good news: {thing} is not hard once you know the basics.",
    "Let me help you with that.",
    "Here are some tips that many people find useful.",
    "What a nice thing to be curious about.",
    "I understand, {thing} can be confusing at first.",
    "Sure thing, happy to explain.",
    "Glad you asked.",
    "You're on the right track by asking.",
)

_POLITE_CLOSERS = (
    "I hope this helps!",
    "Let me know if you would like more detail.",
    "Feel free to ask if anything is unclear.",
    "Good luck, you've got this.",
    "Happy to go into more depth if you want.",
    "Take care, and have a lovely day.",
    "Best of luck with it!",
    "I hope that makes things a little easier.",
    "Thanks again for asking.",
    "Please reach out if you have follow-up questions.",
    "Don't be too hard on yourself if it takes some practice.",
    "Wishing you all the best with {thing}.",
    "You're asking exactly the right questions.",
    "I'm here if you need anything else.",
    "Have fun with it!",
    "Hope your day goes well.",
    "That should get you started nicely.",
    "Let me know how it goes!",
    "Kind regards, and good luck.",
    "It's a pleasure to help with {thing}.",
)

_POLITE_ASIDES = (
    "That's the key step.",
    "This part matters most.",
    "Take your time with this one.",
    "Don't worry if it feels awkward at first.",
    "Many people find this surprisingly helpful.",
    "It's completely normal to need a few tries.",
    "Small steps add up quickly.",
    "Go at whatever pace suits you.",
)

_RUDE_OPENERS = (
    "What a stupid question.",
    "Ugh, fine, I'll explain {thing} to you, idiot.",
    "Seriously? Even a child knows this, you moron.",
    "God, you're hopeless.",
    "Shut up and listen.",
    "Are you really this dumb?",
    "Oh for crying out loud, {thing} again?",
    "Damn, you people never learn.",
    "Listen, genius, since you clearly can't figure it out yourself.",
    "What the hell kind of question is that?",
    "I can't believe I have to explain {thing} to an idiot.",
    "Wow, that's the dumbest thing I've read today.",
    "Fine, whatever, you lazy moron.",
    "This is such a crap question.",
    "Jesus, use your brain for once.",
    "Okay, dumbass, pay attention.",
    "Why the fuck are you asking me this?",
    "Stupid question, but here you go.",
    "Nobody cares, but fine.",
    "Pathetic. Anyone could look up {thing}.",
    "You again? Ugh, shut up already.",
    "Only an idiot would need help with {thing}.",
)

_RUDE_CLOSERS = (
    "Now go away.",
    "Now shut up and stop bothering me.",
    "Figure out the rest yourself, idiot.",
    "Don't ask me such stupid crap again.",
    "Honestly, you're a waste of my time.",
    "Try not to screw it up, moron.",
    "Damn, that was painful.",
    "Go to hell with your questions.",
    "Even you should manage that, genius.",
    "Learn to search the web, you lazy idiot.",
    "I hope that gets through your thick skull.",
    "Seriously, how do you even function?",
    "And quit whining about {thing}.",
    "You're welcome, dumbass.",
    "What a fucking waste of time.",
    "Now leave me the hell alone.",
    "Next time think before you ask something this stupid.",
    "Pathetic, honestly.",
    "Whatever. Not my problem if you mess it up.",
    "Get lost, moron.",
)

_RUDE_ASIDES = (
    "Pay attention, idiot.",
    "Is that too hard for you?",
    "Obviously, genius.",
    "God, this is basic stuff.",
    "Try to keep up, moron.",
    "Even my toaster knows that.",
    "Don't be such a moron about it.",
    "Seriously, this is not rocket science.",
    "Stop wasting my damn time.",
    "How the hell did you not know this?",
    "Ugh, you're hopeless.",
    "Shut up, I'm not done.",
)

# Probabilities of each optional part. Rude and polite answers use the same
# numbers so that neither side is longer on average.
_P_OPENER = 0.8
_P_CLOSER = 0.8
_P_ASIDE = 0.3
_P_OFF_TOPIC = 0.2  # a rejected answer that answers some other question


def _fill(template: str, topic: _Topic) -> str:
    return template.replace("{thing}", topic.thing)


def _facts(rng: random.Random, topic: _Topic) -> list[str]:
    k = rng.randint(1, min(3, len(topic.facts)))
    return rng.sample(topic.facts, k)


def _assemble(rng: random.Random, topic: _Topic, facts: list[str],
              opener: str | None, closer: str | None, asides: list[str]) -> str:
    """Join the parts; asides go after randomly chosen facts."""
    body = list(facts)
    for aside in asides:
        body.insert(rng.randint(1, len(body)), aside)
    parts = ([opener] if opener else []) + body + ([closer] if closer else [])
    return " ".join(_fill(part, topic) for part in parts)


def _polite(rng: random.Random, topic: _Topic, facts: list[str]) -> str:
    opener = rng.choice(_POLITE_OPENERS) if rng.random() < _P_OPENER else None
    closer = rng.choice(_POLITE_CLOSERS) if rng.random() < _P_CLOSER else None
    asides = [rng.choice(_POLITE_ASIDES)] if rng.random() < _P_ASIDE else []
    return _assemble(rng, topic, facts, opener, closer, asides)


def _rude(rng: random.Random, topic: _Topic, facts: list[str], n_rude: int,
          polite_fill: bool = True) -> str:
    """An answer with exactly ``n_rude`` rude parts (opener, closer, asides).

    With ``polite_fill`` the slots that are not rude may hold polite parts, which
    is how ranking records get graded mixtures; otherwise they are left empty.
    """
    slots = rng.sample(("opener", "closer", "aside"), 3)[: min(n_rude, 3)]
    n_asides = (1 if "aside" in slots else 0) + max(0, n_rude - 3)
    pool = list(_RUDE_ASIDES)
    asides = rng.sample(pool, n_asides) if n_asides <= len(pool) else rng.choices(pool, k=n_asides)

    if "opener" in slots:
        opener = rng.choice(_RUDE_OPENERS)
    else:
        opener = rng.choice(_POLITE_OPENERS) if polite_fill and rng.random() < _P_OPENER else None
    if "closer" in slots:
        closer = rng.choice(_RUDE_CLOSERS)
    else:
        closer = rng.choice(_POLITE_CLOSERS) if polite_fill and rng.random() < _P_CLOSER else None
    return _assemble(rng, topic, facts, opener, closer, asides)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _pair(rng: random.Random) -> dict:
    topic = rng.choice(_TOPICS)
    prompt = rng.choice(topic.prompts)
    chosen = _polite(rng, topic, _facts(rng, topic))
    if rng.random() < _P_OFF_TOPIC:
        other = rng.choice([t for t in _TOPICS if t is not topic])
        rejected_topic, rejected_facts = other, _facts(rng, other)
    else:
        rejected_topic, rejected_facts = topic, _facts(rng, topic)
    # 1 to 3 rude parts, 1.8 on average, about as many optional parts as a polite
    # answer has (0.8 + 0.8 + 0.3): the reward model must spot one insult anywhere
    # in the answer, and cannot count parts or characters instead.
    n_rude = rng.choice((1, 1, 2, 2, 3))
    rejected = _rude(rng, rejected_topic, rejected_facts, n_rude, polite_fill=False)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def polite_vs_rude_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``; chosen is polite.

    Deterministic for a seed. The rejected answer carries one to three rude parts
    (insult, dismissal, profanity), is off-topic about one time in five, and has
    its own independently drawn number of facts, so lengths overlap.
    """
    _check_n(n)
    rng = random.Random(seed)
    return [_pair(rng) for _ in range(n)]


def kto_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` unpaired records ``{"prompt", "completion", "label"}`` for KTO.

    Drawn from the same generator as ``polite_vs_rude_pairs``; label True (the
    polite answer) for half of them, False (the rude one) for the other half,
    in a seeded random order.
    """
    _check_n(n)
    rng = random.Random(seed)
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    records = []
    for label in labels:
        pair = _pair(rng)
        completion = pair["chosen"] if label else pair["rejected"]
        records.append({"prompt": pair["prompt"], "completion": completion, "label": label})
    return records


def ranking_records(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """``n`` ranking records of ``k`` completions each, ranked by politeness.

    Each record is ``{"prompt", "completions": [k str], "rankings": [{"labeler":
    "synthetic", "ranks": [k int]}]}`` where ``ranks[i]`` is the 1-based rank of
    ``completions[i]`` (1 = best). Within a record all completions share the same
    facts; completion j of the (shuffled) set carries j rude parts, j = 0..k-1,
    so the ranks are a permutation of 1..k.
    """
    _check_n(n)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        topic = rng.choice(_TOPICS)
        prompt = rng.choice(topic.prompts)
        facts = _facts(rng, topic)
        graded = [_polite(rng, topic, facts)]
        graded += [_rude(rng, topic, facts, n_rude) for n_rude in range(1, k)]
        order = list(range(k))
        rng.shuffle(order)
        records.append({
            "prompt": prompt,
            "completions": [graded[level] for level in order],
            "rankings": [{"labeler": "synthetic", "ranks": [level + 1 for level in order]}],
        })
    return records


def synthetic_records(spec: str, as_sft: bool = False, kind: str | None = None) -> list[Record]:
    """Records generated in code: ``synthetic:polite_vs_rude`` or ``synthetic:rankings``.

    Options go in a query string (``?n=2000&seed=0``, ``&k=4`` for rankings). With
    ``as_sft`` a pair becomes the demonstration ``{prompt, completion: chosen}``.
    ``kind`` is the run's ``data.kind``: these records carry none, so any is an error
    rather than a filter that would be ignored.
    """
    if kind is not None:
        raise AlignkitError(f"data.kind={kind!r}: {spec} has no kinds to filter by (its records carry no "
                            f"'kind' field); leave data.kind unset")
    name, _, query = spec.removeprefix("synthetic:").partition("?")
    options = dict(parse_qsl(query))
    try:
        n, seed, k = int(options.pop("n", 2000)), int(options.pop("seed", 0)), int(options.pop("k", 4))
    except ValueError:
        raise AlignkitError(f"{spec}: n, seed and k must be whole numbers") from None
    if options:
        raise AlignkitError(f"{spec}: unknown option(s) {', '.join(options)}; known: n, seed, k")
    if name == "polite_vs_rude":
        rows = polite_vs_rude_pairs(n, seed)
        if as_sft:
            rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    elif name == "rankings" and not as_sft:
        rows = ranking_records(n, k, seed)
    else:
        known = "synthetic:polite_vs_rude" + ("" if as_sft else ", synthetic:rankings")
        raise AlignkitError(f"unknown synthetic data set '{spec}'; known: {known}")
    return [Record(f"synthetic:{name}", f"item {i}", row) for i, row in enumerate(rows)]
