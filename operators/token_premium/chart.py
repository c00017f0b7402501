"""PNG chart of token premium per language, one bar group per tokenizer."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def plot_premium(table: pa.Table, path: Path, ref_lang: str) -> Path:
    """Draw premium(T, L) as grouped bars; unreliable rows (unk_share > limit) are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table.to_pylist()
    langs = sorted({r["lang"] for r in rows})
    tokenizers = sorted({r["tokenizer"] for r in rows})
    width = 0.8 / max(len(tokenizers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(langs) * max(1, len(tokenizers) / 2)), 4))
    x = np.arange(len(langs))
    for i, tok in enumerate(tokenizers):
        by_lang = {r["lang"]: r for r in rows if r["tokenizer"] == tok}
        values = [by_lang.get(lang, {}).get("premium") or 0.0 for lang in langs]
        bars = ax.bar(x + i * width, values, width, label=tok)
        for bar, lang in zip(bars, langs, strict=True):
            if not by_lang.get(lang, {}).get("reliable", True):
                bar.set_hatch("//")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x + width * (len(tokenizers) - 1) / 2, langs, rotation=60, ha="right")
    ax.set_ylabel(f"token premium vs {ref_lang}")
    ax.set_title("Tokenizer premium per language (hatched: >10% UNK chars)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
