"""Data curation on a CPU: a corpus of English prose with known junk injected, the curation
pipeline's stages measured against that truth, and the tiny model trained on the raw and on the
curated corpus.

    python experiments/curation_demo.py [--workdir runs/curation_demo] [--quick]

The clean corpus is the English prose of the default local text, the Python standard library:
the docstrings of the modules `[a-s]*.py` (those of at least MIN_DOC_WORDS words; small ones of
one module grouped into documents of a few hundred words) and the `[a-s]*` topics of
`pydoc_data/topics.py` (cut at paragraphs into documents of a few hundred words). The held-out
text is the same from `[t-z]*`. Each document gets a fake URL. Injected, each record carrying its
truth in a `truth` field (which the pipeline passes through):

    exact_dup        a clean document again, some with whitespace or case changed, some at the
                     same URL, most at a mirror's URL                    -> exact_dedup (text)
    url_dup          an edited version (a tenth of the words changed) at the same URL, written
                     differently (http, www., a trailing slash, a fragment, the host's case)
                                                                         -> exact_dedup (url)
    near_dup         a copy with a few % of the words substituted, inserted or deleted (Jaccard
                     of the 5-gram shingles with the original in [0.8, 0.95])
                                                                         -> minhash_dedup
    boilerplate      navigation and cookie-notice lines added to a quarter of the clean documents
                     (the documents are clean: the lines, not the documents, should go)
                                                                         -> line_dedup
    junk             digit tables, symbol spam, repeated lines, keyword spam with blocklisted
                     words, very short pages                             -> heuristics
    other_language   pages of French, German and Spanish sentences      -> language
    low_quality      word salad: the words of a clean document shuffled (no rule sees it) -> quality,
                     a classifier trained on labels from a function that knows the truth of the
                     documents it is shown (a stand-in for human or Llama 2 judges)

Each stage runs as its own pipeline on the previous stage's output (`llama_jax.data.curation
.pipeline.run`, on a local Spark with one core, `local[1]`), so that what every stage removed is
known by id. For each stage: the precision and recall of what it removed against the truth meant
for it, and for line_dedup the share of injected boilerplate lines removed and of clean lines
removed. Throughput: each stage alone on ten versions of the raw corpus (different documents),
on one core, timed from its input to its counted output (Spark's per-job overhead included); a run
with no stage measures reading, counting and writing.

Then the tiny model (experiments/tiny.py's architecture) is trained twice, on the raw corpus and
on the curated one, with the same tokenizer (trained once on the clean training text), steps,
batch, sequence length, seed and packing (concat_then_split, so both see the same number of
tokens), and the held-out loss (mean NLL per token, `llama_jax.eval.perplexity`) of both is
reported. Tables are printed and written to WORKDIR/tables.md (and WORKDIR/summary.json).
--quick: a smaller corpus and a few training steps, a couple of minutes (the numbers mean little).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import importlib.util
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "posttrain_demo", Path(__file__).with_name("posttrain_demo.py")
)
posttrain_demo = importlib.util.module_from_spec(_spec)
sys.modules["posttrain_demo"] = posttrain_demo  # its dataclasses look their module up while being defined
_spec.loader.exec_module(posttrain_demo)  # the demos' shared timed log

MARKER = ".curation_demo"
MIN_DOC_WORDS = 40
# Language identification before the heuristics: Gopher's stop-word rule (at least two English
# stop words) would otherwise remove the other-language pages first.
STAGE_ORDER = ("exact_text", "exact_url", "minhash", "line_dedup", "language", "heuristics", "quality")
# What each stage is meant to remove (line_dedup is meant to remove lines, not documents).
TARGET = {
    "exact_text": "exact_dup",
    "exact_url": "url_dup",
    "minhash": "near_dup",
    "line_dedup": None,
    "heuristics": "junk",
    "language": "other_language",
    "quality": "low_quality",
}
TRUTHS = ("clean", "exact_dup", "url_dup", "near_dup", "junk", "other_language", "low_quality")
BLOCKLIST = ("casino", "jackpot", "free spins", "payday loan", "replica watches", "miracle pills")


@dataclasses.dataclass(frozen=True)
class Scale:
    max_clean: int = 0  # clean training documents kept (0: all)
    max_heldout: int = 0
    exact_dup: float = 0.08  # injected documents, as shares of the clean ones
    url_dup: float = 0.03
    near_dup: float = 0.08
    boilerplate: float = 0.25  # share of the clean documents that get boilerplate lines
    junk: float = 0.08
    other_language: float = 0.06
    low_quality: float = 0.10
    throughput_copies: int = 10  # versions of the raw corpus for the throughput measurement
    # Training (tiny's architecture and optimizer).
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    quick: bool = False


FULL = Scale()
QUICK = Scale(
    max_clean=160, max_heldout=30, steps=12, batch_size=8, seq_len=128, throughput_copies=2, quick=True
)


# --- the clean text ----------------------------------------------------------------------------


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def _words(text: str) -> int:
    return len(text.split())


def docstring_documents(pattern: str, target_words: int = 250) -> list[tuple[str, str]]:
    """(module, text) documents of the docstrings in the stdlib modules matching `pattern`."""
    out = []
    for path in sorted(glob.glob(os.path.join(_stdlib(), pattern))):
        module = Path(path).stem
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        pieces = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and _words(doc) >= MIN_DOC_WORDS:
                    pieces.append(doc.strip())
        group: list[str] = []
        for piece in pieces:
            group.append(piece)
            if sum(map(_words, group)) >= target_words:
                out.append((module, "\n\n".join(group)))
                group = []
        if group and (sum(map(_words, group)) >= 100 or not out or out[-1][0] != module):
            out.append((module, "\n\n".join(group)))
        elif group:
            out[-1] = (module, out[-1][1] + "\n\n" + "\n\n".join(group))
    return out


def topic_documents(first_letters: str, target_words: int = 300) -> list[tuple[str, str]]:
    """(topic, text) documents of pydoc_data's topics whose name starts with one of the letters."""
    path = os.path.join(_stdlib(), "pydoc_data", "topics.py")
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        topics = next(
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets)
        )
    except (OSError, StopIteration, SyntaxError, ValueError):
        return []
    out = []
    for name in sorted(topics):
        if name[0].lower() not in first_letters:
            continue
        group: list[str] = []
        for paragraph in topics[name].split("\n\n"):
            if paragraph.strip():
                group.append(paragraph.strip("\n"))
            if sum(map(_words, group)) >= target_words:
                out.append((name, "\n\n".join(group)))
                group = []
        if sum(map(_words, group)) >= MIN_DOC_WORDS:
            out.append((name, "\n\n".join(group)))
    return out


def clean_corpus(train: bool) -> list[dict]:
    """The clean documents, each with a fake URL. The stdlib repeats itself in places (pydoc's
    topics include each other's sections): a document sharing half its 5-gram shingles with an
    earlier one is left out, so that "clean" has no duplicates of its own."""
    from llama_jax.data.curation.text import shingles

    pattern, letters = ("[a-s]*.py", "abcdefghijklmnopqrs") if train else ("[t-z]*.py", "tuvwxyz")
    docs, seen = [], []
    for kind, items in (("api", docstring_documents(pattern)), ("reference", topic_documents(letters))):
        for i, (name, text) in enumerate(items):
            grams = shingles(text, 5)
            if _words(text) < MIN_DOC_WORDS or any(
                len(grams & g) >= 0.5 * min(len(grams), len(g)) for g in seen
            ):
                continue
            seen.append(grams)
            docs.append({"text": text, "url": f"https://docs.example.org/{kind}/{name}/{i}.html"})
    return docs


# --- what is injected --------------------------------------------------------------------------

BOILERPLATE = (
    "Home | Products | Documentation | Blog | Contact us",
    "Skip to main content",
    "We use cookies to improve your experience. By continuing to browse you accept our cookie policy.",
    "Subscribe to our newsletter to get the latest updates in your inbox.",
    "Copyright 2024 Example Docs Ltd. All rights reserved.",
    "Share this page: Twitter | Facebook | LinkedIn | Email",
    "Was this page helpful? Yes | No",
    "Privacy Policy | Terms of Use | Accessibility | Sitemap",
)

# Original sentences for the other-language pages.
SENTENCES = {
    "fr": [
        "Le marché du samedi ouvre très tôt, bien avant que la ville ne se réveille vraiment.",
        "Ma grand-mère gardait toujours une boîte de biscuits au citron dans le placard de la cuisine.",
        "Nous avons longé la rivière jusqu'au vieux moulin, puis nous sommes rentrés par la forêt.",
        "Le train de nuit pour Marseille était complet, alors nous avons pris la route.",
        "Il faut arroser les tomates le soir, quand la terre a fini de chauffer au soleil.",
        "La bibliothèque municipale prête désormais des outils de jardinage et des jeux de société.",
        "Après la pluie, les enfants cherchaient des escargots le long du muret de pierre.",
        "Le boulanger du coin prépare une brioche aux pralines qui disparaît avant midi.",
        "Cette année, le festival de musique se tiendra dans la cour de l'ancienne école.",
        "Elle a appris à réparer son vélo en regardant son voisin travailler dans le garage.",
        "Les hirondelles sont revenues plus tard que d'habitude, à cause du froid du printemps.",
        "Pour bien réussir une soupe, il vaut mieux couper les légumes en morceaux réguliers.",
        "Le musée propose une visite nocturne à la lumière des lampes de poche le vendredi.",
        "Nous avons passé tout l'après-midi à trier les vieilles photos de famille.",
        "Le chemin côtier est fermé pendant l'hiver, car les falaises deviennent dangereuses.",
        "Chaque matin, le facteur s'arrête quelques minutes pour discuter avec le fleuriste.",
        "On entend parfois les cloches du village voisin quand le vent souffle de l'est.",
        "Le professeur a demandé aux élèves d'écrire une lettre à une personne de leur choix.",
        "Au fond du jardin, un vieux cerisier donne encore des fruits chaque été.",
        "La réunion des habitants a décidé de planter des arbres le long de la grande rue.",
    ],
    "de": [
        "Der Wochenmarkt auf dem Kirchplatz beginnt jeden Donnerstag um sieben Uhr früh.",
        "Mein Onkel baut in seiner Werkstatt kleine Boote aus altem Treibholz.",
        "Nach dem Gewitter roch der ganze Wald nach nassem Moos und frischem Harz.",
        "Wir haben den letzten Bus verpasst und sind deshalb zu Fuß nach Hause gegangen.",
        "Im Herbst sammeln die Kinder Kastanien und basteln daraus lustige Figuren.",
        "Die Stadtbücherei hat jetzt auch am Sonntagnachmittag für alle Besucher geöffnet.",
        "Unsere Nachbarin backt jedes Jahr zu Weihnachten mehr als zehn Sorten Plätzchen.",
        "Auf dem Dachboden fanden wir eine Kiste mit Briefen aus der Zeit unserer Urgroßeltern.",
        "Der Radweg entlang des Flusses ist im Frühling besonders schön und ruhig.",
        "Vor der Prüfung hat sie jeden Abend zwei Stunden in der Küche gelernt.",
        "Die Katze schläft am liebsten auf der warmen Fensterbank über der Heizung.",
        "Im kleinen Theater am Markt wird diese Woche ein Stück über einen Leuchtturm gespielt.",
        "Wenn der Schnee schmilzt, steigt der Bach hinter dem Haus oft über die Ufer.",
        "Der Bäcker um die Ecke verkauft morgens frische Brezeln, die noch warm sind.",
        "Wir wollen im Sommer mit dem Zug durch die Berge bis an den großen See fahren.",
        "Das alte Rathaus wird renoviert und soll bald ein Café und ein Museum beherbergen.",
        "Jeden Sonntag spielen die Rentner im Park Schach unter der großen Linde.",
        "Der Förster erklärte uns, warum manche Bäume ihre Blätter früher verlieren.",
        "Nach dem Umzug dauerte es Wochen, bis alle Kartons endlich ausgepackt waren.",
        "In der Dämmerung sieht man manchmal Rehe am Rand der Wiese stehen.",
    ],
    "es": [
        "El mercado del barrio se llena de gente los sábados por la mañana.",
        "Mi abuelo cultivaba pimientos y calabacines en un pequeño huerto detrás de la casa.",
        "Después de la tormenta, las calles del pueblo olían a tierra mojada y a jazmín.",
        "Perdimos el último tren, así que dormimos en una pensión cerca de la estación.",
        "En verano, los vecinos sacan las sillas a la acera para charlar hasta muy tarde.",
        "La biblioteca pública organiza talleres de lectura para niños todos los miércoles.",
        "Mi hermana aprendió a tocar la guitarra con las canciones que escuchaba en la radio.",
        "El camino hacia el faro está cerrado en invierno por culpa del viento.",
        "Cada otoño recogemos castañas en el bosque y las asamos en la chimenea.",
        "La panadería de la esquina vende unas empanadas de atún que se acaban enseguida.",
        "El museo de la ciudad abrirá una sala dedicada a los oficios antiguos.",
        "Mientras esperábamos el autobús, empezó a nevar por primera vez en años.",
        "Los estudiantes plantaron árboles frutales en el patio de la escuela.",
        "Mi vecina guarda semillas de tomate de un año para otro en sobres de papel.",
        "Desde la terraza se ve el río y, en los días claros, las montañas del norte.",
        "El festival de teatro de calle atrae a artistas de muchos países distintos.",
        "Para preparar un buen caldo hay que tener paciencia y dejarlo hervir despacio.",
        "La reunión de la asociación decidió arreglar los bancos de la plaza mayor.",
        "Por la noche se oyen las ranas en la charca que hay junto al molino.",
        "Tardamos casi un mes en ordenar todos los libros después de la mudanza.",
    ],
}


def edit(text: str, rate: float, vocabulary: list[str], rng: random.Random) -> str:
    """`text` with about `rate` of its words substituted, inserted or deleted (lines kept)."""
    lines = [line.split(" ") for line in text.split("\n")]
    places = [(i, j) for i, line in enumerate(lines) for j, word in enumerate(line) if word]
    for i, j in sorted(rng.sample(places, max(1, round(rate * len(places)))), reverse=True):
        op = rng.choice(("substitute", "insert", "delete"))
        if op == "substitute":
            lines[i][j] = rng.choice(vocabulary)
        elif op == "insert":
            lines[i].insert(j, rng.choice(vocabulary))
        else:
            del lines[i][j]
    return "\n".join(" ".join(line) for line in lines)


def jaccard(a: str, b: str, n: int = 5) -> float:
    from llama_jax.data.curation.text import shingles

    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def mirror_url(url: str, k: int) -> str:
    return url.replace("https://docs.example.org/", f"https://mirror{k}.example.net/copies/")


def url_variant(url: str, rng: random.Random) -> str:
    """The same URL after url_key's normalisation, written differently."""
    rest = url[len("https://docs.example.org") :]
    return rng.choice(
        (
            f"http://docs.example.org{rest}",
            f"https://www.docs.example.org{rest}",
            f"https://docs.example.org{rest}/",
            f"https://docs.example.org{rest}#section-2",
            f"https://Docs.Example.ORG{rest}",
        )
    )


def junk_page(kind: str, vocabulary: list[str], rng: random.Random) -> str:
    words = lambda k: " ".join(rng.choice(vocabulary) for _ in range(k))  # noqa: E731
    if kind == "digits":
        rows = [" | ".join(str(rng.randint(0, 99999)) for _ in range(8)) for _ in range(rng.randint(15, 30))]
        return f"{words(3)} {rng.randint(1990, 2024)}\n" + "\n".join(rows)
    if kind == "symbols":
        return "\n".join(
            " ".join(rng.choice(("###", "#", "...", "## >>", "***")) + " " + words(2) for _ in range(6))
            for _ in range(rng.randint(8, 15))
        )
    if kind == "repeated":
        line = words(rng.randint(8, 14)).capitalize() + "."
        other = words(rng.randint(8, 14)).capitalize() + "."
        return "\n".join([line, other] * rng.randint(8, 15))
    if kind == "spam":
        spam = list(BLOCKLIST) + [
            "best",
            "online",
            "cheap",
            "bonus",
            "win",
            "today",
            "offer",
            "deal",
            "click",
        ]
        return "\n".join(
            " ".join(rng.choice(spam) if rng.random() < 0.6 else rng.choice(vocabulary) for _ in range(12))
            for _ in range(rng.randint(6, 12))
        )
    # short: an error page or a stub
    return rng.choice(
        (
            f"Error {rng.randint(400, 599)}: the page /{words(1)}/{rng.randint(1, 10**6)} could not be found.",
            f"{words(rng.randint(3, 8)).capitalize()}. Loading {rng.randint(1, 99)}% ...",
            f"Login required. Session {rng.randint(10**5, 10**7)} expired; please sign in again.",
        )
    )


def foreign_page(language: str, rng: random.Random) -> str:
    chosen = rng.sample(SENTENCES[language], rng.randint(9, 16))
    paragraphs, i = [], 0
    while i < len(chosen):
        k = rng.randint(2, 4)
        paragraphs.append(" ".join(chosen[i : i + k]))
        i += k
    return "\n".join(paragraphs)


def word_salad(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12))


def build_corpus(clean: list[dict], scale: Scale, seed: int = 1234) -> tuple[list[dict], dict]:
    """The raw corpus: the clean documents and the injected ones, with `truth` and `uid`, in an
    order where each original comes before its copies; and statistics of what was injected.
    Copies are made of the original as it is in the corpus, boilerplate lines included."""
    from llama_jax.data.curation.text import text_key

    rng = random.Random(seed)
    n = len(clean)
    vocabulary = sorted({w for d in clean for w in d["text"].split() if w.isalpha()})
    records = [{**d, "truth": "clean", "boilerplate_lines": 0} for d in clean]
    for rec in rng.sample(records, round(scale.boilerplate * n)):
        lines = rng.sample(BOILERPLATE, rng.randint(2, 4))
        top = lines[: rng.randint(0, len(lines))]
        bottom = lines[len(top) :]
        rec["text"] = "\n".join(top + [rec["text"]] + bottom)
        rec["boilerplate_lines"] = len(lines)
    originals = list(range(n))
    copies: dict[int, list[int]] = defaultdict(list)  # original -> its copies
    stats: dict = {"near_dup_jaccard": []}

    def add(record: dict, original: int | None = None) -> None:
        records.append({"boilerplate_lines": 0, **record})
        if original is not None:
            copies[original].append(len(records) - 1)

    for k in range(round(scale.exact_dup * n)):
        o = rng.choice(originals)
        text, url = records[o]["text"], mirror_url(clean[o]["url"], k)
        variant = ("same", "whitespace", "case", "same_url")[k % 4]
        if variant == "whitespace":
            text = "  ".join(text.split()) + "\n"
        elif variant == "case":
            text = text.upper() if k % 8 < 4 else text.lower()
        elif variant == "same_url":
            url = clean[o]["url"]
        add({"text": text, "url": url, "truth": "exact_dup", "variant": variant}, o)
    for _ in range(round(scale.url_dup * n)):
        o = rng.choice(originals)
        text = edit(records[o]["text"], 0.1, vocabulary, rng)
        add({"text": text, "url": url_variant(clean[o]["url"], rng), "truth": "url_dup"}, o)
    for k in range(round(scale.near_dup * n)):
        o = rng.choice(originals)
        for _ in range(50):  # a rate that puts the Jaccard similarity in [0.8, 0.95]
            text = edit(records[o]["text"], rng.uniform(0.004, 0.03), vocabulary, rng)
            similarity = jaccard(text, records[o]["text"])
            if 0.8 <= similarity <= 0.95:
                break
        stats["near_dup_jaccard"].append(similarity)
        add(
            {
                "text": text,
                "url": mirror_url(clean[o]["url"], 1000 + k),
                "truth": "near_dup",
                "jaccard": round(similarity, 3),
            },
            o,
        )
    kinds = ("digits", "symbols", "repeated", "spam", "short")
    for k in range(round(scale.junk * n)):
        kind = kinds[k % len(kinds)]
        add(
            {
                "text": junk_page(kind, vocabulary, rng),
                "url": f"https://spam{k}.example.com/p",
                "truth": "junk",
                "variant": kind,
            }
        )
    for k in range(round(scale.other_language * n)):
        language = ("fr", "de", "es")[k % 3]
        add(
            {
                "text": foreign_page(language, rng),
                "url": f"https://{language}.example.eu/page/{k}",
                "truth": "other_language",
                "variant": language,
            }
        )
    for k in range(round(scale.low_quality * n)):
        o = rng.choice(originals)
        add(
            {
                "text": word_salad(clean[o]["text"], rng),
                "url": f"https://farm.example.biz/{k}",
                "truth": "low_quality",
            }
        )
    # Shuffle, then give every original the first position of its group, so that each stage
    # keeps the original (the earliest id) and removes the copies.
    order = list(range(len(records)))
    rng.shuffle(order)
    position = {index: p for p, index in enumerate(order)}
    for o, group in copies.items():
        members = [o] + group
        slots = sorted(position[m] for m in members)
        rng.shuffle(group)
        for m, slot in zip([o] + group, slots):
            position[m] = slot
    ordered = [None] * len(records)
    for index, p in position.items():
        ordered[p] = records[index]
    for uid, rec in enumerate(ordered):
        rec["uid"] = uid
    stats["low_quality_keys"] = sorted(text_key(r["text"]) for r in ordered if r["truth"] == "low_quality")
    stats["counts"] = dict(Counter(r["truth"] for r in ordered))
    stats["boilerplate_docs"] = sum(1 for r in ordered if r["boilerplate_lines"])
    return ordered, stats


LABEL_MODULE = '''"""Written by experiments/curation_demo.py: the quality stage's labels. It knows which texts
are word salad (the truth of the sample it is shown), standing in for human or Llama 2 judges."""

import json

from llama_jax.data.curation.text import text_key

with open({path!r}, encoding="utf-8") as f:
    LOW = set(json.load(f))


def label(texts):
    return ["low" if text_key(t) in LOW else "high" for t in texts]
'''


# --- running the stages ------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(paths) -> list[dict]:
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def stage_specs(label_function: str, quality_threshold: float = 0.5) -> dict[str, dict]:
    return {
        "exact_text": {"exact_dedup": {"key": "text"}},
        "exact_url": {"exact_dedup": {"key": "url"}},
        "minhash": {"minhash_dedup": {"ngram": 5, "num_perm": 128, "threshold": 0.8}},
        "line_dedup": {"line_dedup": {"min_documents": 6, "min_chars": 10}},
        "heuristics": {"heuristics": {"blocklist": list(BLOCKLIST)}},
        "language": {"language": {"keep": ["en"], "languages": ["en", "fr", "de", "es", "it", "pt", "nl"]}},
        "quality": {"quality": {"labels": {"function": label_function}, "threshold": quality_threshold}},
    }


def run_pipeline(input_path: Path, output: Path, stages: list[dict]) -> tuple[list[dict], dict]:
    """Runs one curation pipeline; (its output documents sorted by uid, its summary)."""
    from llama_jax.data.curation import pipeline
    from llama_jax.data.curation.config import parse_config

    config = parse_config(
        {
            "inputs": [{"path": str(input_path)}],
            "stages": stages,
            "output": str(output),
            "shards": 1,
            "samples": 0,
        }
    )
    # One core (local[1]), so that documents per second are per core; the session is reused.
    summary = pipeline.run(config, session=pipeline.spark_session("local[1]"), log=lambda *_: None)
    docs = read_jsonl(sorted(glob.glob(str(output / "data" / "part-*.jsonl"))))
    return sorted(docs, key=lambda d: d["uid"]), summary


def throughput(raw: list[dict], root: Path, specs: dict, copies: int, log) -> dict:
    """Each stage alone on `copies` versions of the raw corpus (after the first, each version has
    a third of every line's words swapped for other words of the document, so that the versions
    are different documents), on one core: (documents, the stage's seconds, reading and writing
    excluded) per stage, and the whole run's seconds with no stage for reading and writing."""
    rng = random.Random(1)
    big = root / "throughput.jsonl"
    docs = []
    for copy in range(copies):
        for doc in raw:
            text = doc["text"]
            if copy:
                words = text.split()
                lines = []
                for line in text.splitlines():
                    parts = line.split()
                    lines.append(" ".join(rng.choice(words) if rng.random() < 1 / 3 else w for w in parts))
                text = "\n".join(lines)
            docs.append({**doc, "text": text, "uid": f"{doc['uid']}.{copy}"})
    write_jsonl(big, docs)
    _, baseline = run_pipeline(big, root / "throughput" / "baseline", [])
    result = {"documents": len(docs), "read_write_seconds": baseline["seconds"], "stages": {}}
    for name in STAGE_ORDER:
        _, summary = run_pipeline(big, root / "throughput" / name, [specs[name]])
        result["stages"][name] = summary["stages"][0]["seconds"]
        log(f"throughput: {name} on {len(docs):,} documents in {result['stages'][name]:.1f} s")
    return result


def throughput_table(result: dict) -> str:
    n = result["documents"]
    lines = [["stage", "documents", "seconds (1 core)", "documents/s per core"]]
    for name, seconds in result["stages"].items():
        lines.append([name, f"{n:,}", f"{seconds:.1f}", f"{n / seconds:,.0f}"])
    seconds = result["read_write_seconds"]
    lines.append(["read, count, write JSONL (no stage)", f"{n:,}", f"{seconds:.1f}", f"{n / seconds:,.0f}"])
    return markdown_table(lines)


def line_counts(text: str) -> Counter:
    return Counter(line.strip() for line in text.splitlines() if line.strip())


def boilerplate_measure(before: list[dict], after: list[dict]) -> dict:
    """Injected boilerplate lines removed, and clean lines removed, by line_dedup."""
    kept = {d["uid"]: d for d in after}
    injected = injected_removed = clean_lines = clean_removed = 0
    for doc in before:
        lines_in = line_counts(doc["text"])
        lines_out = line_counts(kept[doc["uid"]]["text"]) if doc["uid"] in kept else Counter()
        for line, count in lines_in.items():
            gone = count - min(count, lines_out.get(line, 0))
            if line in BOILERPLATE:
                injected += count
                injected_removed += gone
            elif doc["truth"] == "clean":
                clean_lines += count
                clean_removed += gone
    return {
        "boilerplate_lines": injected,
        "boilerplate_removed": injected_removed,
        "clean_lines": clean_lines,
        "clean_lines_removed": clean_removed,
    }


def clean_failures(removed: list[dict], spec: dict) -> dict[str, int]:
    from llama_jax.data.curation import text as text_lib
    from llama_jax.data.curation.config import parse_config

    rules = parse_config({"inputs": ["-"], "stages": [spec]}).stages[0][1]
    pattern = text_lib.blocklist_pattern(rules.blocklist)
    reasons = Counter(
        text_lib.heuristic_failure(d["text"], rules, pattern) for d in removed if d["truth"] == "clean"
    )
    return dict(reasons.most_common())


def curate(raw_path: Path, root: Path, label_function: str, quality_threshold: float, log) -> dict:
    specs = stage_specs(label_function, quality_threshold)
    current = read_jsonl([raw_path])
    truth = {d["uid"]: d["truth"] for d in current}
    _, baseline = run_pipeline(raw_path, root / "baseline", [])
    log(f"read + write only: {len(current)} documents in {baseline['seconds']:.1f} s")
    results, removed_by = {}, {}
    stage_input = raw_path
    for name in STAGE_ORDER:
        docs, summary = run_pipeline(stage_input, root / name, [specs[name]])
        kept = {d["uid"] for d in docs}
        removed = [d for d in current if d["uid"] not in kept]
        for d in removed:
            removed_by[d["uid"]] = name
        target = TARGET[name]
        in_target = sum(1 for d in current if d["truth"] == target)
        hit = sum(1 for d in removed if d["truth"] == target)
        result = {
            "docs_in": len(current),
            "docs_out": len(docs),
            "removed": len(removed),
            "removed_by_truth": dict(Counter(d["truth"] for d in removed)),
            "target": target,
            "target_in": in_target,
            "precision": hit / len(removed) if removed and target else None,
            "recall": hit / in_target if in_target else None,
            "seconds": summary["seconds"],
            "reasons": summary["stages"][0]["removed"],
        }
        if name == "line_dedup":
            result["lines"] = boilerplate_measure(current, docs)
        if name == "quality":
            info = json.loads((root / name / "report" / "quality.classifier.json").read_text())
            p_good = defaultdict(list)
            for d in docs:
                p_good[d["truth"]].append(d["quality"])
            info["median_p_good_of_kept"] = {t: sorted(v)[len(v) // 2] for t, v in p_good.items()}
            result["classifier"] = info
        if name == "heuristics":  # why clean documents failed the rules
            result["clean_reasons"] = clean_failures(removed, specs[name])
        results[name] = result
        log(
            f"{name}: {len(current)} -> {len(docs)} documents in {summary['seconds']:.1f} s; removed "
            f"{dict(Counter(d['truth'] for d in removed))}"
        )
        stage_input = root / f"{name}.jsonl"
        write_jsonl(stage_input, docs)
        current = docs
    final = {d["uid"] for d in current}
    fate = {t: Counter() for t in TRUTHS}
    for uid, t in truth.items():
        fate[t][removed_by.get(uid, "kept")] += 1
    return {
        "baseline_seconds": baseline["seconds"],
        "stages": results,
        "fate": {t: dict(c) for t, c in fate.items()},
        "curated": str(stage_input),
        "curated_docs": len(final),
    }


# --- training ----------------------------------------------------------------------------------


def train_tokenizer(clean: list[dict], root: Path, vocab_size: int) -> str:
    from llama_jax.tokenizer import train_sentencepiece

    corpus = root / "tokenizer_corpus.txt"
    corpus.write_text("".join(line + "\n" for d in clean for line in d["text"].splitlines() if line.strip()))
    trained = train_sentencepiece([str(corpus)], str(root / "sp"), vocab_size, quiet=True)
    path = root / "tokenizer.model"
    Path(trained).replace(path)
    return str(path)


def training_experiment(name: str, corpus: str, tokenizer: str, scale: Scale):
    from llama_jax.config import CheckpointConfig, TrainConfig
    from llama_jax.data.config import DataConfig, SourceConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny

    base = tiny.experiment()
    return dataclasses.replace(
        base,
        name=f"curation_demo_{name}",
        model=dataclasses.replace(base.model, max_seq_len=max(base.model.max_seq_len, scale.seq_len)),
        train=TrainConfig(
            steps=scale.steps,
            batch_size=scale.batch_size,
            seq_len=scale.seq_len,
            log_every=10,
            eval_every=10**9,
            eval_batches=0,
            seed=scale.seed,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1),
        data=DataConfig(
            sources=(SourceConfig(corpus, kind="jsonl", field="text", name=name),),
            tokenizer_path=tokenizer,
            seed=scale.seed,
            packing="concat_then_split",
        ),
        eval_data=None,
        description=f"curation_demo: tiny on the {name} corpus",
    )


def heldout_loss(workdir: Path, tokenizer: str, texts: list[str], seq_len: int) -> dict:
    from llama_jax import eval as eval_lib
    from llama_jax.generate import load_model

    cfg, params, tok = load_model(str(workdir), None, tokenizer)
    documents = [tok.encode(t, bos=True) for t in texts]
    result = eval_lib.perplexity(params, cfg, documents, seq_len=seq_len, batch_size=8, texts=texts)
    return {
        "nll": result.nll,
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "bpb": result.bits_per_byte,
    }


def corpus_tokens(path: str, tokenizer: str) -> int:
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return sum(len(tok.encode(d["text"], bos=True)) + 1 for d in read_jsonl([path]))


# --- tables ------------------------------------------------------------------------------------


def markdown_table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def stage_table(cur: dict) -> str:
    lines = [
        [
            "stage",
            "meant to remove",
            "docs in",
            "removed",
            "precision",
            "recall",
            "clean docs removed",
            "other removed",
            "seconds (whole run)",
        ]
    ]
    for name in STAGE_ORDER:
        r = cur["stages"][name]
        by = r["removed_by_truth"]
        other = {t: c for t, c in by.items() if t not in ("clean", r["target"])}
        lines.append(
            [
                name,
                f"{r['target']} ({r['target_in']})" if r["target"] else "lines (see below)",
                str(r["docs_in"]),
                str(r["removed"]),
                pct(r["precision"]),
                pct(r["recall"]),
                str(by.get("clean", 0)),
                ", ".join(f"{t} {c}" for t, c in sorted(other.items())) or "-",
                f"{r['seconds']:.1f}",
            ]
        )
    lines.append(
        ["(read + write only)", "-", str(cur["stages"]["exact_text"]["docs_in"]), "-", "-", "-", "-", "-",
         f"{cur['baseline_seconds']:.1f}"]
    )  # fmt: skip
    return markdown_table(lines)


def lines_table(cur: dict) -> str:
    m = cur["stages"]["line_dedup"]["lines"]
    return markdown_table(
        [
            ["line_dedup, by line", "lines", "removed", "share removed"],
            [
                "injected boilerplate lines",
                str(m["boilerplate_lines"]),
                str(m["boilerplate_removed"]),
                pct(m["boilerplate_removed"] / max(1, m["boilerplate_lines"])),
            ],
            [
                "lines of clean documents",
                str(m["clean_lines"]),
                str(m["clean_lines_removed"]),
                pct(m["clean_lines_removed"] / max(1, m["clean_lines"])),
            ],
        ]
    )


def reasons_table(cur: dict) -> str:
    reasons = cur["stages"]["heuristics"]["clean_reasons"]
    return markdown_table([["rule", "clean documents removed"]] + [[r, str(c)] for r, c in reasons.items()])


def fate_table(cur: dict, counts: dict) -> str:
    lines = [["truth", "documents"] + list(STAGE_ORDER) + ["kept"]]
    for t in TRUTHS:
        fate = cur["fate"][t]
        lines.append(
            [t, str(counts.get(t, 0))]
            + [str(fate.get(s, 0) or "") for s in STAGE_ORDER]
            + [str(fate.get("kept", 0))]
        )
    return markdown_table(lines)


def training_table(runs: dict, scale: Scale) -> str:
    lines = [
        [
            "trained on",
            "seed",
            "documents",
            "corpus tokens",
            "epochs seen",
            "final train loss",
            "held-out NLL",
            "held-out ppl",
            "bits/byte",
        ]
    ]
    tokens_seen = scale.steps * scale.batch_size * scale.seq_len
    for (name, seed), r in runs.items():
        lines.append(
            [
                name,
                str(seed),
                str(r["docs"]),
                f"{r['corpus_tokens']:,}",
                f"{tokens_seen / r['corpus_tokens']:.2f}",
                f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-",
                f"{r['heldout']['nll']:.4f}",
                f"{r['heldout']['perplexity']:.2f}",
                f"{r['heldout']['bpb']:.4f}",
            ]
        )
    for corpus in ("raw", "curated"):
        nll = [r["heldout"]["nll"] for (name, _), r in runs.items() if name == corpus]
        if len(nll) > 1:
            mean = sum(nll) / len(nll)
            lines.append([f"{corpus}, mean", "-", "-", "-", "-", "-", f"{mean:.4f}", "-", "-"])
    return markdown_table(lines)


# --- main --------------------------------------------------------------------------------------


def prepare_workdir(root: Path) -> bool:
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            print(
                f"error: {root} is not empty and not this demo's; choose another --workdir.", file=sys.stderr
            )
            return False
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/curation_demo")
    parser.add_argument(
        "--quick", action="store_true", help="a smaller corpus and a few steps: proves it runs"
    )
    parser.add_argument("--no-train", action="store_true", help="only the curation part")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument(
        "--quality-threshold",
        type=float,
        default=0.5,
        help="the quality stage removes documents whose probability of high quality is below this",
    )
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    root = Path(args.workdir).resolve()
    if not prepare_workdir(root):
        return 2
    start, log = time.time(), posttrain_demo.timed_log()

    # The corpora.
    clean = clean_corpus(train=True)
    heldout = clean_corpus(train=False)
    rng = random.Random(0)
    if scale.max_clean:
        clean = rng.sample(clean, min(scale.max_clean, len(clean)))
    if scale.max_heldout:
        heldout = rng.sample(heldout, min(scale.max_heldout, len(heldout)))
    raw, stats = build_corpus(clean, scale)
    raw_path = root / "raw.jsonl"
    write_jsonl(raw_path, raw)
    write_jsonl(root / "heldout.jsonl", heldout)
    jac = stats["near_dup_jaccard"]
    log(
        f"corpus: {len(clean)} clean documents ({sum(_words(d['text']) for d in clean):,} words), "
        f"{len(raw)} in all {stats['counts']}; {stats['boilerplate_docs']} with boilerplate; near duplicates' "
        f"Jaccard {min(jac):.2f}-{max(jac):.2f} (mean {sum(jac) / len(jac):.2f}); held out {len(heldout)} documents"
    )
    (root / "low_quality_keys.json").write_text(json.dumps(stats["low_quality_keys"]))
    (root / "curation_demo_labels.py").write_text(
        LABEL_MODULE.format(path=str(root / "low_quality_keys.json"))
    )
    sys.path.insert(0, str(root))

    cur = curate(raw_path, root / "curation", "curation_demo_labels:label", args.quality_threshold, log)
    speed = throughput(raw, root / "curation", stage_specs("curation_demo_labels:label", args.quality_threshold),
                       scale.throughput_copies, log)  # fmt: skip
    tables = [
        f"## Curation stages ({len(raw)} documents in, {cur['curated_docs']} out)\n\n" + stage_table(cur),
        f"## Throughput: each stage alone on {speed['documents']:,} documents, one core\n\n"
        + throughput_table(speed),
        f"quality classifier: {json.dumps(cur['stages']['quality']['classifier'])}",
        "## Boilerplate lines (line_dedup)\n\n" + lines_table(cur),
        "## Why the heuristics removed clean documents\n\n" + reasons_table(cur),
        "## Where each kind of document went (the stage that removed it)\n\n"
        + fate_table(cur, stats["counts"]),
    ]
    runs = {}
    if not args.no_train:
        from llama_jax import train as train_lib

        tokenizer = train_tokenizer(clean, root, tiny_vocab())
        log("tokenizer trained on the clean training text")
        for seed in args.seeds:
            for name, corpus in (("raw", str(raw_path)), ("curated", cur["curated"])):
                workdir = root / f"train_{name}_seed{seed}"
                t0 = time.time()
                exp = training_experiment(name, corpus, tokenizer, dataclasses.replace(scale, seed=seed))
                metrics = train_lib.train(exp, workdir, quiet=True)
                seconds = time.time() - t0
                loss = heldout_loss(workdir, tokenizer, [d["text"] for d in heldout], scale.seq_len)
                runs[(name, seed)] = {
                    "docs": len(read_jsonl([corpus])),
                    "corpus_tokens": corpus_tokens(corpus, tokenizer),
                    "train_loss": float(metrics["loss"]) if "loss" in metrics else None,
                    "heldout": loss,
                    "seconds": seconds,
                }
                log(f"trained on {name} (seed {seed}) in {seconds:.0f} s: held-out NLL {loss['nll']:.4f}")
        tables.append(
            f"## tiny trained on each corpus ({scale.steps} steps x {scale.batch_size} x {scale.seq_len} tokens, "
            f"seeds {', '.join(map(str, args.seeds))}; held-out: {len(heldout)} clean documents of [t-z])\n\n"
            + training_table(runs, scale)
        )
    text = f"# curation_demo ({'quick' if args.quick else 'full'} scale)\n\n" + "\n\n".join(tables) + "\n"
    print("\n" + text)
    (root / "tables.md").write_text(text)
    summary = {
        "scale": dataclasses.asdict(scale),
        "counts": stats["counts"],
        "near_dup_jaccard": {"min": min(jac), "max": max(jac), "mean": sum(jac) / len(jac)},
        "curation": cur,
        "throughput": speed,
        "training": [{"corpus": name, "seed": seed, **r} for (name, seed), r in runs.items()],
        "wall_seconds": time.time() - start,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {root / 'tables.md'} and {root / 'summary.json'}")
    return 0


def tiny_vocab() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny

    return tiny.experiment().model.vocab_size


if __name__ == "__main__":
    sys.exit(main())
