"""``curate report --trend`` and the drift flags of ``curate nightly --fail-on-drift``."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from conftest import commit_tables, tiny_pipeline
from PIL import Image

from jobs.cli.main import main
from jobs.ops.trend import FLAG, LINE, collect_nights, drift_flags, outside, write_trend

CHROMIUM = Path("/usr/bin/chromium")
NIGHTS = [f"2026-04-0{i}" for i in range(1, 7)]
DOCS = 20
SHIFTED = NIGHTS[4]
P_JITTER = [0.0, 0.01, -0.01, 0.02, 0.0, -0.005]
DCPDD_JITTER = [0.0, 0.01, -0.01, 0.005, 0.0, -0.005]
QUARANTINED = [1, 2, 3, 2, 2, 2]


def commit_nights(out: Path, shift: str) -> None:
    """Six small nights; on the fifth, ``shift`` = "score" moves p_machine up by 0.3 and
    "quarantine" quarantines 10 rows."""
    for i, night in enumerate(NIGHTS):
        p_shift = 0.3 if shift == "score" and night == SHIFTED else 0.0
        q = 10 if shift == "quarantine" and night == SHIFTED else QUARANTINED[i]
        docs = pa.table({
            "id": [f"{night}-{j}" for j in range(DOCS)], "text": [f"doc {j}" for j in range(DOCS)],
            "n_chars": [5] * DOCS,
            "p_machine": [j / DOCS + P_JITTER[i] + p_shift for j in range(DOCS)],
            "dcpdd": [-j / 10 + DCPDD_JITTER[i] for j in range(DOCS)],
            "smollm2__n_scored": [9] * DOCS,  # 10 tokens per document
        })
        selected = pa.table({"id": [f"{night}-0", f"{night}-1", f"{night}-2"],
                             "operator": ["preselect", "preselect", "sae_select"]})
        premium = pa.table({"tokenizer": ["cl100k", "cl100k"], "lang": ["eng_Latn", "fra_Latn"],
                            "premium": [1.0, 1.4 + i / 100]})
        quarantine = pa.table({"id": [f"q{k}" for k in range(q)], "quarantine_stage": ["read"] * q})
        stages = [{"name": "read", "rows_in": DOCS + q, "rows_out": DOCS, "quarantined": q, "seconds": 0.0},
                  {"name": "lm_smollm2", "rows_in": DOCS, "rows_out": DOCS, "quarantined": 0, "seconds": 4.0}]
        commit_tables(str(out), night, f"r{i}", {"documents": docs, "selected": selected,
                                                "token_premium": premium, "quarantine": quarantine},
                      pipeline="tiny", seconds=30.0 + i, rows_in=DOCS + q, rows_out=DOCS,
                      rows_quarantined=q, stages=json.dumps(stages), started_at=f"r{i}")


@pytest.fixture(scope="module")
def score_shift(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trend") / "out"
    commit_nights(out, "score")
    return out


def test_mad_rule():
    assert outside(10.0, [1.0, 2.0, 3.0, 2.0]) == (True, 2.0, 0.5)
    assert outside(3.4, [1.0, 2.0, 3.0, 2.0])[0] is False  # 1.4 ≤ 3 × 0.5
    assert outside(2.0, [2.0] * 5)[0] is False and outside(2.1, [2.0] * 5)[0] is True  # MAD 0


def test_measures_per_night(score_shift):
    nights = collect_nights(str(score_shift))
    assert [n.run_date for n in nights] == NIGHTS
    first = nights[0]
    assert (first.rows_in, first.rows_out, first.rows_quarantined, first.seconds) == (21, 20, 1, 30.0)
    assert first.quarantine_share == pytest.approx(1 / 21)
    assert first.tokens_per_s == {"lm_smollm2": pytest.approx(20 * 10 / 4.0)}
    assert first.selection == {"preselect": pytest.approx(0.1), "sae_select": pytest.approx(0.05)}
    assert set(first.scores) == {"p_machine", "dcpdd"}  # float columns; counts are no scores
    p5, p50, p95 = first.scores["p_machine"]
    assert p50 == pytest.approx(np.quantile([j / 20 for j in range(20)], 0.5))
    assert (p5, p95) == (pytest.approx(np.quantile([j / 20 for j in range(20)], 0.05)),
                         pytest.approx(np.quantile([j / 20 for j in range(20)], 0.95)))
    assert nights[2].premium == {("cl100k", "eng_Latn"): 1.0, ("cl100k", "fra_Latn"): pytest.approx(1.42)}
    assert [n.run_date for n in collect_nights(str(score_shift), since=NIGHTS[3])] == NIGHTS[3:]


@pytest.mark.parametrize("shift, measure", [("score", "median p_machine"), ("quarantine", "quarantine share")])
def test_exactly_the_shifted_night_is_flagged(tmp_path, score_shift, shift, measure):
    out = score_shift
    if shift != "score":
        out = tmp_path / "out"
        commit_nights(out, shift)
    flags = drift_flags(collect_nights(str(out)))
    assert [(f.run_date, f.measure) for f in flags] == [(SHIFTED, measure)]
    page = write_trend(str(out)).read_text()
    assert re.findall(r"<li class=flag>night (\S+): ([a-z_ ]+) ", page) == [(SHIFTED, measure)]
    assert f"<td>{SHIFTED}</td>" in page and f"<td>{measure}</td>" in page  # in the nights table


def test_cli_trend_and_nightly_fail_on_drift(score_shift, small_corpus, tmp_path, capsys, caplog):
    assert main(["report", "--trend", "--output", str(score_shift), "--since", NIGHTS[2]]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == score_shift / "reports" / "trend.html"
    page = path.read_text()
    assert f"curate trend {NIGHTS[2]} to {NIGHTS[-1]}" in page and f"<td>{NIGHTS[1]}</td>" not in page
    assert "<li class=flag>night 2026-04-05: median p_machine" in page  # judged on the full history

    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(str(small_corpus), str(score_shift), "tiny")))
    with caplog.at_level(logging.WARNING, logger="curate.trend"):
        assert main(["nightly", str(pipeline), "--date", SHIFTED, "--fail-on-drift"]) == 3
    assert f"drift: night {SHIFTED}: median p_machine" in caplog.text
    assert main(["nightly", str(pipeline), "--date", SHIFTED]) == 0  # logged, not failing
    caplog.clear()
    assert main(["nightly", str(pipeline), "--date", NIGHTS[-1], "--fail-on-drift"]) == 0
    assert "drift:" not in caplog.text


def test_nothing_committed_is_a_user_error(tmp_path, capsys):
    assert main(["report", "--trend", "--output", str(tmp_path / "none")]) == 2
    assert "no committed night" in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_trend_renders_in_headless_chromium(score_shift, tmp_path):
    path = write_trend(str(score_shift))
    page = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 8  # rows, quarantine share, seconds, tokens/s, selection, 2 scores, premium
    line = tuple(int(LINE[k:k + 2], 16) for k in (1, 3, 5))
    for data in images:  # every plot has drawn series, not only axes
        plot = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
        assert (np.abs(plot - line).max(axis=-1) < 12).sum() > 100 or \
            len(np.unique(plot.reshape(-1, 3), axis=0)) > 200
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,6000", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (6000, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (np.abs(pixels - line).max(axis=-1) < 12).sum() > 3000  # series lines drawn
    red = tuple(int(FLAG[k:k + 2], 16) for k in (1, 3, 5))
    assert (np.abs(pixels - red).max(axis=-1) < 12).sum() > 100  # the flagged night's marker
