"""The text the smoke-test tokenizer is trained on: generated, seeded, offline.

Sentences are drawn from fixed word lists with a seeded ``random.Random``, so the same
seed always yields the same corpus (and so the same tokenizer). The corpus carries
English prose, inflected words, numbers, dates, code and chat turns, which gives the
byte-level BPE enough distinct pairs to learn a few thousand merges. Nothing here reads
the repository or the network: editing the docs must not change the smoke model.
"""

from __future__ import annotations

import random

NOUNS = """
time year people way day man woman child world life hand part place case week company
system program question work government number night point home water room mother area
money story fact month lot right study book eye job word business issue side kind head
house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office
door health person art war history party result change morning reason research girl guy
moment air teacher force education foot boy age policy process music market sense nation
plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son
view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center
couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news
test movie north love support technology step baby computer type attention film tree source
organization hair window evidence population truth song river garden bridge engine network
server request token memory budget queue batch packet signal kernel vector matrix layer
model weight bottle stone cloud forest mountain island ocean village letter window kitchen
"""

VERBS = """
ask become begin call change come consider continue create decide develop die expect
fall feel find follow give happen hear help hold include keep kill know lead learn leave
let like live look lose love make meet move need offer open pay play provide pull put
reach read remain remember report run say seem send serve set show sit speak spend stand
start stay stop suggest take talk tell think try turn understand use wait walk want watch
win work write build carry check clean climb close count cover cross draw drink drive
enjoy explain fill finish fix grow guess hope jump kick laugh listen mark miss order paint
pass pick plant point prepare print push rain reply rest return roll save share shout
sign smile sort sound spell start study touch travel visit wash wish wonder measure pack
load stream schedule allocate compute train encode decode sample generate
"""

ADJECTIVES = """
new good high old great big small large national young different long little important
political bad white real best right social only public sure low early able human local
late hard major better economic strong possible whole free military true federal
international full special easy clear recent certain personal open red difficult available
likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general
environmental financial blue democratic dark various entire close legal religious cold
final main green nice huge popular traditional cultural quiet bright heavy soft warm quick
slow empty busy calm brave clever gentle proud silent ancient modern tiny wide narrow deep
"""

ADVERBS = """
also very often however too usually really early never always sometimes together likely
simply generally instead actually again rather almost especially ever quickly probably
already below directly therefore else thus easily eventually exactly certainly normally
currently extremely finally constantly properly slowly quietly suddenly carefully
"""

FUNCTION_WORDS = """
the a an this that these those my your his her its our their some every each no any
of to in for on with at by from up about into over after beneath under above through
and but or so because while although if when where before until since though
"""

NAMES = """
Alice Bob Carol David Emma Frank Grace Henry Irene James Karen Liam Maria Noah Olivia
Paris London Berlin Tokyo Madrid Lisbon Oslo Cairo Lima Seoul Monday Tuesday Friday
January March July October December Python Linux Ray Serve Llama Qwen
"""

_CODE = (
    "def {v}_{n}({n}, {n2}=None):\n    return {n} + {i}\n",
    "for {n} in range({i}):\n    {n2}.append({n} * {j})\n",
    "if {n} > {i}:\n    print(\"{a} {n2}\")\n",
    "{n} = {{\"{n2}\": {i}, \"{a}\": [{j}, {i}]}}\n",
    "class {N}{N2}:\n    {n}: int = {i}\n",
)


def _words(block: str) -> list[str]:
    return block.split()


def _inflect(rng: random.Random, word: str, suffixes: tuple[str, ...]) -> str:
    suffix = rng.choice(suffixes)
    if suffix and word.endswith("e") and suffix[0] in "ei":
        word = word[:-1]
    return word + suffix


class _Vocabulary:
    def __init__(self) -> None:
        self.nouns, self.verbs = _words(NOUNS), _words(VERBS)
        self.adjectives, self.adverbs = _words(ADJECTIVES), _words(ADVERBS)
        self.function_words, self.names = _words(FUNCTION_WORDS), _words(NAMES)


def _sentence(rng: random.Random, v: _Vocabulary) -> str:
    def noun() -> str:
        return _inflect(rng, rng.choice(v.nouns), ("", "", "s"))

    def verb() -> str:
        return _inflect(rng, rng.choice(v.verbs), ("", "s", "ed", "ing"))

    def adj() -> str:
        return _inflect(rng, rng.choice(v.adjectives), ("", "", "er", "ly"))

    det, fw = rng.choice(v.function_words[:13]), rng.choice(v.function_words[13:])
    shapes = (
        f"{det} {adj()} {noun()} {verb()} {fw} the {noun()}",
        f"{rng.choice(v.names)} {rng.choice(v.adverbs)} {verb()} {det} {noun()}",
        f"{det} {noun()} of {rng.choice(v.names)} {verb()} {rng.randint(2, 9999)} {noun()}",
        f"why did {det} {noun()} {verb()} {fw} {rng.choice(v.names)}?",
        (f"{det} {noun()}, {det} {noun()} and {det} {adj()} {noun()} {verb()} on "
         f"{rng.randint(1, 28)} {rng.choice(v.names)} {rng.randint(1900, 2030)}"),
        (f"{verb()} the {noun()} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
         f"({rng.uniform(0, 100):.2f}% {adj()})"),
    )
    text = rng.choice(shapes)
    return text[0].upper() + text[1:] + ("" if text.endswith("?") else rng.choice(".!."))


def _code(rng: random.Random, v: _Vocabulary) -> str:
    n, n2 = rng.sample(v.nouns, 2)
    return rng.choice(_CODE).format(
        v=rng.choice(v.verbs), n=n, n2=n2, a=rng.choice(v.adjectives), i=rng.randint(0, 999),
        j=rng.randint(2, 64), N=n.capitalize(), N2=n2.capitalize())


def _chat(rng: random.Random, v: _Vocabulary) -> str:
    turns = [f"{role}\n{_sentence(rng, v)} {_sentence(rng, v)}"
             for role in ("system", "user", "assistant")[rng.randint(0, 1):]]
    return "\n".join(turns)


def generate_corpus(seed: int = 0, num_paragraphs: int = 4000) -> list[str]:
    """``num_paragraphs`` paragraphs of prose, code and chat turns, the same for a seed."""
    rng, vocab = random.Random(seed), _Vocabulary()
    paragraphs = []
    for _ in range(num_paragraphs):
        kind = rng.random()
        if kind < 0.1:
            paragraphs.append(_code(rng, vocab))
        elif kind < 0.25:
            paragraphs.append(_chat(rng, vocab))
        else:
            paragraphs.append(" ".join(_sentence(rng, vocab) for _ in range(rng.randint(2, 6))))
    return paragraphs
