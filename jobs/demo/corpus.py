"""The demo corpus: human-written Python docs (label 0), continuations the demo model wrote (label 1) and a parallel set in 20 languages."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.demo.cache import (
    DemoAssetError,
    Log,
    atomic_dir,
    demo_dir,
    free_threads,
    is_complete,
    locked,
    torch_threads,
    write_json_atomic,
)
from jobs.demo.constants import DEMO_DOCS_PER_CLASS
from jobs.demo.model import WHEEL_PACKAGE, WHEEL_VERSION, prepare_demo_model

PARALLEL_FILE = Path(__file__).parent / "data" / "parallel_sentences.json"

N_HUMAN = 240
N_MACHINE = 120
HUMAN_SHARDS = 2
MIN_CHARS, MAX_CHARS = 400, 2000
#: 2: the machine-written docs are sampled by vLLM (when installed; transformers before).
CORPUS_VERSION = 2

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                    ("lang", pa.string()), ("label", pa.int8())])

# Pure-Python (or always built-in) stdlib modules whose docstrings feed the human-written docs.
DOC_MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.protocols", "asyncio.queues", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "asyncio.transports", "base64", "bdb", "binascii", "bisect", "builtins", "calendar",
    "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "cProfile", "csv", "dataclasses", "datetime", "difflib",
    "dis", "doctest", "email.headerregistry", "email.message", "email.mime.base", "email.parser",
    "email.policy", "email.utils", "enum", "errno", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib.abc", "importlib.metadata", "importlib.util", "inspect", "io", "ipaddress", "itertools",
    "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "mailbox", "math", "mimetypes", "modulefinder", "multiprocessing.connection",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.queues", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "stat", "statistics", "string",
    "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types",
    "typing", "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner",
    "unittest.suite", "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid",
    "venv", "warnings", "wave", "weakref", "wsgiref.handlers", "wsgiref.simple_server", "xml.dom.minidom",
    "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils", "zipapp", "zipfile",
    "zoneinfo",
])


@dataclass(frozen=True)
class GenerationParams:
    """How the demo model writes the machine-generated documents."""

    max_new_tokens: int = 160
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50  # transformers' default, which its generate applied here before it was explicit
    repetition_penalty: float = 1.1
    batch_size: int = 30  # transformers only: vLLM takes every prompt in one batch
    seed: int = 1234


# ---------------------------------------------------------------- human-written docs

_RULE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")  # reST heading underlines
_BULLET = re.compile(r"^([*\-•]|\d+\.)\s")
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z0-9\"'“(*]|\s*$)")  # not after "e.g." / "a.k.a."


def clean_doc(raw: str) -> str:
    """Prose paragraphs of a doc: no headings, code, doctests; lines joined, bullets kept."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw.strip()):
        lines = block.split("\n")
        if any(_RULE.match(line) for line in lines):
            continue
        if lines[0][:1].isspace() or lines[0].lstrip().startswith(">>>"):
            continue
        joined: list[str] = []
        for line in (re.sub(r"\s+", " ", line).strip() for line in lines):
            if joined and not _BULLET.match(line):
                joined[-1] = f"{joined[-1]} {line}".strip()
            else:
                joined.append(line)
        text = "\n".join(line for line in joined if line)
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def truncate_at_sentence(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` if short enough, else its longest prefix within ``limit`` ending a sentence."""
    if len(text) <= limit:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= limit]
    return text[: ends[-1]] if ends else ""


def first_sentence(text: str) -> str:
    """The first sentence of the first paragraph (the whole paragraph if it has no sentence end)."""
    paragraph = text.split("\n")[0]
    match = _SENTENCE_END.search(paragraph)
    return paragraph[: match.end()] if match else paragraph


def doc_id(text: str) -> str:
    """Stable id: the first 16 hex chars of the text's sha1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def raw_python_docs() -> list[str]:
    """Help topics, then module/class/function docstrings of ``DOC_MODULES``, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            docs.extend(_module_docstrings(importlib.import_module(name)))
    return docs


def _module_docstrings(module: Any) -> list[str]:
    """The module's docstring and those of the public classes/functions it defines."""
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr, None)
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if attr.startswith("_") or not defined_here:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            docs.append(inspect.getdoc(obj) or "")
    return docs


def python_doc_pool() -> list[str]:
    """Cleaned, deduplicated docs of 400-2000 chars, ordered by their id (a fixed shuffle)."""
    pool: dict[str, str] = {}
    for raw in raw_python_docs():
        text = truncate_at_sentence(clean_doc(raw))
        if len(text) >= MIN_CHARS:
            pool.setdefault(doc_id(text), text)
    return [pool[key] for key in sorted(pool)]


def split_human_and_prompts(pool: list[str]) -> tuple[list[str], list[str]]:
    """The first ``N_HUMAN`` docs stay human; prompts are first sentences of *other* docs.

    Disjoint on purpose: no machine document shares its opening with a human one, so a detector
    cannot score on a copied prefix.
    """
    human, rest = pool[:N_HUMAN], pool[N_HUMAN:]
    prompts = [s for s in map(first_sentence, rest) if _good_prompt(s)][:N_MACHINE]
    if len(human) < N_HUMAN or len(prompts) < N_MACHINE:
        raise DemoAssetError(f"only {len(pool)} python docs found: need {N_HUMAN} + {N_MACHINE}")
    return human, prompts


def reference_docs() -> list[str]:
    """Python docs the demo corpus does not contain: a DC-PDD reference disjoint from the scored
    documents, as the method requires. The docstrings too short for the corpus (under
    ``MIN_CHARS`` once cleaned), and the pool docs after those whose first sentences became prompts."""
    pool = python_doc_pool()
    rest, used, n_prompts = pool[N_HUMAN:], 0, 0
    for used, doc in enumerate(rest, start=1):  # noqa: B007 (used after the loop)
        n_prompts += _good_prompt(first_sentence(doc))
        if n_prompts == N_MACHINE:
            break
    in_pool = set(pool)
    short: dict[str, str] = {}
    for raw in raw_python_docs():
        text = clean_doc(raw)
        if len(text) >= 40 and len(truncate_at_sentence(text)) < MIN_CHARS and text not in in_pool:
            short.setdefault(doc_id(text), text)
    human, prompts = split_human_and_prompts(pool)
    scored = "\n\x00".join(human)  # no reference doc may sit inside a human doc or hold a prompt
    candidates = [short[key] for key in sorted(short)] + rest[used:]
    return [r for r in candidates if r not in scored and not any(p in r for p in prompts)]


def _good_prompt(sentence: str) -> bool:
    return 30 <= len(sentence) <= 300 and sentence[:1].isupper() and sentence[-1] in ".!?:"


# ---------------------------------------------------------------- machine-written docs


def generate_texts(prompts: list[str], model_dir: Path, cache: Path, log: Log,
                   params: GenerationParams = GenerationParams()) -> list[str]:
    """Prompt + continuation by the demo model; raw continuations cached by generator, model, params
    and prompts."""
    generator = pick_generator()
    parts = ["raw-v1", WHEEL_PACKAGE, WHEEL_VERSION, asdict(params), prompts]
    if generator != "transformers":  # the transformers key predates the choice: its caches stay valid
        parts.insert(1, generator)
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]
    path = demo_dir(cache) / "generated" / f"smollm2-{key}.json"
    if path.is_file():
        log(f"demo corpus: generated texts cached at {path}")
        continuations = json.loads(path.read_text(encoding="utf-8"))["continuations"]
    else:
        start = time.perf_counter()
        continuations = GENERATORS[generator](prompts, model_dir, params, log)
        seconds = round(time.perf_counter() - start, 1)
        log(f"demo corpus: generated {len(continuations)} texts with {generator} in {seconds} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"params": asdict(params), "generator": generator, "seconds": seconds,
                                 "prompts": prompts, "continuations": continuations})
    return [tidy_generation(p, c) for p, c in zip(prompts, continuations, strict=True)]


def pick_generator() -> str:
    """``vllm`` when it is installed (all prompts in one batch: ~4x faster on 2 CPUs), else
    ``transformers``."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def _generate_vllm(prompts: list[str], model_dir: Path, params: GenerationParams, log: Log) -> list[str]:
    """Sample the raw continuations with vLLM in a child process (``jobs.demo.vllm_generate``)."""
    threads = free_threads()
    log(f"demo corpus: generating {len(prompts)} texts with vLLM in one batch, {threads} thread(s)")
    with tempfile.TemporaryDirectory(prefix="curate-generate-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "params": asdict(params),
                                   "threads": threads, "output": str(out)}))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-m", "jobs.demo.vllm_generate", str(job)],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise DemoAssetError(f"vLLM generation failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))["continuations"]


def _generate_transformers(prompts: list[str], model_dir: Path, params: GenerationParams, log: Log) -> list[str]:
    """Load the model and sample the continuations batch by batch on the cores that are free."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    threads = free_threads()
    log(f"demo corpus: generating {len(prompts)} texts with transformers (vLLM is not installed), "
        f"batches of {params.batch_size}, {threads} thread(s)")
    with torch_threads(threads):
        return _sample_batches(model, tokenizer, prompts, params, log)


GENERATORS = {"vllm": _generate_vllm, "transformers": _generate_transformers}


def _sample_batches(model: Any, tokenizer: Any, prompts: list[str], params: GenerationParams,
                    log: Log) -> list[str]:
    """Sample the raw continuations batch by batch (left padding) from one fixed seed."""
    import torch

    torch.manual_seed(params.seed)
    texts: list[str] = []
    size = params.batch_size
    for first in range(0, len(prompts), size):
        batch = prompts[first: first + size]
        start = time.perf_counter()
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id)
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        texts.extend(new)
        log(f"demo corpus: batch {first // size + 1}/{-(-len(prompts) // size)} "
            f"({len(batch)} texts) in {time.perf_counter() - start:.1f} s")
    return texts


def tidy_generation(prompt: str, continuation: str) -> str:
    """Prompt + continuation, minus a trailing half sentence (human docs end on a full one).

    The cut is skipped when it would drop more than half of the continuation (e.g. code).
    """
    continuation = re.sub(r"[ \t]+\n", "\n", continuation.rstrip())
    continuation = re.sub(r"\n{3,}", "\n\n", continuation)
    ends = [m.end() for m in _SENTENCE_END.finditer(continuation)]
    if ends and ends[-1] >= len(continuation) / 2:
        continuation = continuation[: ends[-1]]
    return (prompt + continuation).strip()


# ---------------------------------------------------------------- parallel sentences and tables


def parallel_sentences() -> dict[str, list[str]]:
    """``{lang: sentences}`` from ``jobs/demo/data/parallel_sentences.json`` (same index = same meaning)."""
    data = json.loads(PARALLEL_FILE.read_text(encoding="utf-8"))["sentences"]
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise DemoAssetError(f"{PARALLEL_FILE}: languages have different sentence counts {lengths}")
    return data


def docs_table(texts: list[str], source: str, label: int) -> pa.Table:
    """English docs as rows with content-hash ids."""
    return _table([doc_id(t) for t in texts], texts, source, ["eng_Latn"] * len(texts), label)


def parallel_table() -> pa.Table:
    """One row per (sentence, language); ``par-{i:03d}`` ids join the languages."""
    ids, texts, langs = [], [], []
    for lang, sentences in sorted(parallel_sentences().items()):
        for i, text in enumerate(sentences):
            ids.append(f"par-{i:03d}")
            texts.append(text)
            langs.append(lang)
    return _table(ids, texts, "parallel", langs, 0)


def _table(ids: list[str], texts: list[str], source: str, langs: list[str], label: int) -> pa.Table:
    n = len(texts)
    return pa.table({"id": ids, "text": texts, "source": [source] * n, "lang": langs,
                     "label": [label] * n}, schema=SCHEMA)


def _shards(table: pa.Table, parts: int) -> list[pa.Table]:
    size = -(-table.num_rows // parts)
    return [table.slice(i * size, size) for i in range(parts)]


# ---------------------------------------------------------------- the corpus


def prepare_demo_corpus(cache: Path | None = None, log: Log = print) -> Path:
    """Write ``corpus/`` (human, machine, parallel shards) and ``parallel/``; return ``corpus/``."""
    demo = demo_dir(cache)
    corpus, parallel = demo / "corpus", demo / "parallel"
    if is_complete(corpus, CORPUS_VERSION) and is_complete(parallel):
        log(f"demo corpus: cached at {corpus}")
        return corpus
    with locked(demo, "corpus"):
        if is_complete(corpus, CORPUS_VERSION) and is_complete(parallel):
            log(f"demo corpus: cached at {corpus}")
            return corpus
        _build_corpus(demo, prepare_demo_model(demo.parent, log), log)
    return corpus


def _build_corpus(demo: Path, model_dir: Path, log: Log) -> None:
    log("demo corpus: collecting Python docs and docstrings")
    pool = python_doc_pool()
    human, prompts = split_human_and_prompts(pool)
    log(f"demo corpus: {len(pool)} usable docs -> {len(human)} human, {len(prompts)} prompts")
    machine = generate_texts(prompts, model_dir, demo.parent, log)
    tables = {f"human-{i:05d}": t for i, t in enumerate(_shards(docs_table(human, "python-docs", 0),
                                                                 HUMAN_SHARDS))}
    tables["machine-00000"] = docs_table(machine, "smollm2-generated", 1)
    tables["parallel-00000"] = parallel_table()
    counts = {name: t.num_rows for name, t in tables.items()}
    with atomic_dir(demo / "corpus", {"asset_version": CORPUS_VERSION, "shards": counts}) as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
    with atomic_dir(demo / "parallel", {"shards": {"parallel-00000": counts["parallel-00000"]}}) as tmp:
        pq.write_table(tables["parallel-00000"], tmp / "parallel-00000.parquet")
    log(f"demo corpus: wrote {demo / 'corpus'} {counts} and {demo / 'parallel'}")


# ------------------------------------------------------------------ the documents each build reads


def demo_documents(corpus: Path, per_class: int = DEMO_DOCS_PER_CLASS) -> pa.Table:
    """The PAWN demo's documents: the first ``per_class`` human (label 0) and machine-written
    (label 1) English docs, by id."""
    import polars as pl

    frame = (pl.read_parquet(corpus / "*.parquet")
             .filter(pl.col("source").is_in(["python-docs", "smollm2-generated"]))
             .sort("id").group_by("label", maintain_order=True).head(per_class).sort("label", "id"))
    return frame.select("id", "text", "label").to_arrow()


def human_docs(corpus: Path) -> pa.Table:
    """Human-written demo docs (label 0, source python-docs), sorted by id: id, text."""
    import polars as pl

    frame = pl.read_parquet(sorted(corpus.glob("human-*.parquet")))
    return frame.filter(pl.col("label") == 0).select("id", "text").sort("id").to_arrow()
