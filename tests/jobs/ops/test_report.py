"""``curate report``: a self-contained HTML page; rendered for real in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import commit_tables
from matplotlib.figure import Figure
from PIL import Image

from jobs.cli.main import main
from jobs.ops.report import report_path, score_columns, write_report

CHROMIUM = Path("/usr/bin/chromium")
DATE = "2026-02-03"
STAGES = [{"name": "read", "rows_in": 9, "rows_out": 8, "quarantined": 1, "seconds": 0.0},
          {"name": "pawn", "rows_in": 8, "rows_out": 8, "quarantined": 0, "seconds": 4.25},
          {"name": "lm", "rows_in": 8, "rows_out": 8, "quarantined": 0, "seconds": 3.5, "build_seconds": 9.44,
           "began_s": 12.3, "ended_s": 15.9}]  # a stage of a run that records its load and window


def _png() -> bytes:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """One committed night: scored documents, a quarantined row, token premium + its chart."""
    out = tmp_path / "out"
    texts = [f"document number {i} " + "x" * 300 for i in range(8)]
    texts[3] = "<script>alert('boom')</script> & more"
    docs = pa.table({"id": [f"d{i}" for i in range(8)], "text": texts, "source_row": list(range(8)),
                     "n_chars": [len(t) for t in texts], "p_machine": [i / 10 for i in range(8)],
                     "dcpdd": [float(-i) for i in range(8)]})
    tables = {"documents": docs,
              "quarantine": pa.table({"id": ["q"], "quarantine_stage": ["read"]}),
              "token_premium": pa.table({"tokenizer": ["cl100k"], "lang": ["fra_Latn"],
                                         "premium": [1.42]})}
    commit_tables(str(out), DATE, "r1", tables, pipeline="demo", started_at="20260203T010000",
                  seconds=5.5, rows_in=9, rows_out=8, rows_quarantined=1, stages=json.dumps(STAGES))
    (out / "reports" / f"run_date={DATE}").mkdir(parents=True)
    (out / "reports" / f"run_date={DATE}" / "token_premium.png").write_bytes(_png())
    return out


def test_score_column_rule():
    described = [("id", "VARCHAR"), ("source_row", "BIGINT"), ("n_chars", "BIGINT"),
                 ("tokens__cl100k", "BIGINT"), ("p_machine", "DOUBLE"), ("sae", "FLOAT[]"),
                 ("keep", "BOOLEAN"), ("minkpp", "FLOAT")]
    assert score_columns(described) == ["p_machine", "minkpp"]
    no_scores = [d for d in described if d[1] not in ("DOUBLE", "FLOAT")]
    assert score_columns(no_scores) == ["n_chars", "tokens__cl100k"]
    assert score_columns(described, ["n_chars"]) == ["n_chars"]


def test_report_is_self_contained(output):
    path = write_report(str(output), DATE)
    assert path == output / "reports" / f"run_date={DATE}" / "report.html"
    page = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<link" not in page and "<script" not in page  # the evil text is escaped
    assert "&lt;script&gt;alert(&#x27;boom&#x27;)&lt;/script&gt; &amp; more" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # token premium chart + one histogram per score (p_machine, dcpdd)
    for data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 100
    assert "<h3>p_machine</h3>" in page and "<h3>dcpdd</h3>" in page
    assert "<h3>n_chars</h3>" not in page  # counts are no scores when scores exist
    assert "<td>pawn</td><td>8</td><td>8</td><td>0</td><td>4.25</td><td>0.0</td><td></td>" in page  # stage row
    assert "<td>lm</td><td>8</td><td>8</td><td>0</td><td>3.50</td><td>9.4</td><td>12-16</td>" in page
    assert "<td>cl100k</td><td>fra_Latn</td><td>1.42</td>" in page


def test_top_and_bottom_examples(output):
    page = write_report(str(output), DATE).read_text()
    top = page.split("top 5 by p_machine")[1].split("</table>")[0]
    bottom = page.split("bottom 5 by p_machine")[1].split("</table>")[0]
    assert re.findall(r"<td>(d\d)</td>", top) == ["d7", "d6", "d5", "d4", "d3"]
    assert re.findall(r"<td>(d\d)</td>", bottom) == ["d0", "d1", "d2", "d3", "d4"]
    snippet = "document number 7 " + "x" * (200 - len("document number 7 "))
    assert f"<td>{snippet}</td>" in top  # first 200 characters only


def test_cli_builds_once_then_prints_the_path(output, capsys):
    target = Path(report_path(str(output), DATE))
    assert main(["report", "--output", str(output)]) == 0  # date: the latest committed
    assert capsys.readouterr().out.strip() == str(target)
    built = target.stat().st_mtime_ns
    assert main(["report", "--output", str(output), "--date", DATE]) == 0
    assert target.stat().st_mtime_ns == built
    assert main(["report", "--output", str(output), "--date", "2026-02-04"]) == 2
    assert "nothing is committed for 2026-02-04" in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(output, tmp_path):
    path = write_report(str(output), DATE)
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1200, 3)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, tables and charts, not a blank page
    bars = np.abs(pixels.astype(int) - (0x4C, 0x72, 0xB0)).max(axis=-1) < 12  # histogram bars
    assert bars.sum() > 3000
