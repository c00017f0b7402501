"""The demo DC-PDD frequency table, counted on a reference set disjoint from the demo corpus."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.demo.assets import build_demo_asset
from jobs.demo.corpus import reference_docs
from jobs.train.freq import BatchCounter

#: 2: counted on ``reference_docs()`` (disjoint from the scored corpus), with a tokenizer
#: fingerprint and a source record; version 1 counted the scored corpus itself. (Counting BOS and
#: |V| = config.vocab_size, as DC-PDD's reference code does, leaves the demo table as it was: SmolLM2
#: adds no BOS and its config.vocab_size is its tokenizer's 49,152.)
FREQ_VERSION = 2


def prepare_demo_freq(cache: Path | None = None, log=print) -> Path:
    """``<cache>/demo/freq/smollm2.parquet``: Python docs *not* in the demo corpus, counted with the
    demo model's tokenizer (in-process: a few hundred short docs). A demo stand-in for the large
    general reference corpus DC-PDD uses; disjoint from what ``pipelines/nightly.yaml`` scores."""
    from operators.lm.models import tokenizer_fingerprint
    from operators.membership.math import FrequencyTable

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        scored = "\n\x00".join(pq.read_table(corpus, columns=["text"]).column("text").to_pylist())
        texts = [t for t in reference_docs() if t not in scored]  # disjoint from what is scored
        counter = BatchCounter(str(model), 1024, "text")
        sparse = counter(pa.table({"text": texts}))
        counts = np.zeros(counter.vocab_size, dtype=np.int64)
        counts[sparse["token_id"][0].as_py()] = sparse["count"][0].as_py()
        digest = hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()
        source = {"files": ["jobs.demo.corpus.reference_docs()"], "content_sha256": digest,
                  "documents": len(texts), "disjoint_from": str(corpus)}
        table = FrequencyTable(counts, int(counts.sum()), counter.vocab_size, "smollm2", 1024,
                               tokenizer_fingerprint(counter.tokenizer), source)
        table.save(str(tmp / "smollm2.parquet"))
        log(f"demo freq: {table.n_tokens} tokens counted from {len(texts)} reference docs (not in {corpus})")
        return {"source": "reference_docs", "documents": len(texts), "n_tokens": table.n_tokens}

    return build_demo_asset("freq", build, cache, log, version=FREQ_VERSION) / "smollm2.parquet"
