"""The demo DC-PDD frequency table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs.train.freq import BatchCounter


def prepare_demo_freq(cache: Path | None = None, log=print) -> Path:
    """``<cache>/demo/freq/smollm2.parquet``: the demo corpus counted with the demo model's tokenizer.

    In-process (no Ray: ~800 short docs); a demo stand-in for a large general reference corpus.
    """
    import pyarrow.parquet as pq

    from jobs.demo.assets import build_demo_asset
    from operators.membership.math import FrequencyTable

    def build(tmp: Path, model: Path, corpus: Path) -> dict:
        counter = BatchCounter(str(model), 1024, "text")
        sparse = counter(pq.read_table(corpus, columns=["text"]))
        counts = np.zeros(counter.vocab_size, dtype=np.int64)
        counts[sparse["token_id"][0].as_py()] = sparse["count"][0].as_py()
        table = FrequencyTable(counts, int(counts.sum()), counter.vocab_size, "smollm2", 1024)
        table.save(str(tmp / "smollm2.parquet"))
        log(f"demo freq: {table.n_tokens} tokens counted from {corpus}")
        return {"source": str(corpus), "n_tokens": table.n_tokens}

    return build_demo_asset("freq", build, cache, log) / "smollm2.parquet"
