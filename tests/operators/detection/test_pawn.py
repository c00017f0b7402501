"""PAWN head: parameter counts, alignment, masking, training, persistence."""

from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from operators.detection.features import read_features
from operators.detection.pawn import PawnConfig, PawnHead, count_parameters, load_pawn, pad_batch, save_pawn
from operators.detection.train import bce_smoothed, train_pawn

H = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_head(hidden_size: int = H, seed: int = 0, **kw) -> PawnHead:
    torch.manual_seed(seed)
    return PawnHead(PawnConfig(hidden_size=hidden_size, **kw)).eval()


def random_doc(g: torch.Generator, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(t, 5, generator=g), torch.randn(t, H, generator=g)


@pytest.mark.parametrize(("hidden_size", "expected"), [(768, 989_185), (2048, 1_644_545)])
def test_parameter_count(hidden_size, expected):
    # 512·H + 595,969 (see the PawnHead docstring)
    assert count_parameters(PawnHead(PawnConfig(hidden_size))) == expected
    assert 512 * hidden_size + 199_424 + 198_400 + 198_145 == expected


def test_layer_norms_have_no_bias():
    head = make_head()
    norms = [m for m in head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 6 and all(m.bias is None for m in norms)


def test_gate_input_alignment():
    head = make_head()
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0]

    head.gate_nn.register_forward_hook(hook)
    g = torch.Generator().manual_seed(1)
    m, h, mask = pad_batch([torch.randn(3, 5, generator=g).numpy()], [torch.randn(3, H, generator=g).numpy()])
    m, h, mask = (torch.cat([x, torch.zeros_like(x[:, :2])], 1) for x in (m, h, mask))  # 2 padding rows
    head(m, h, mask.bool())
    x = seen["x"][0]                                             # [T=5, 2H+1]
    torch.testing.assert_close(x[:3, :H], h[0, :3])              # h_t
    torch.testing.assert_close(x[:2, H:2 * H], h[0, 1:3])        # h_{t+1}
    assert (x[2, H:2 * H] == 0).all()                            # last real row: h_{t+1} = 0
    torch.testing.assert_close(x[:, -1], torch.tensor([0, 1, 2, 3, 4]) / 512)


def test_padding_does_not_change_a_document():
    head = make_head()
    g = torch.Generator().manual_seed(2)
    short, long = random_doc(g, 4), random_doc(g, 9)
    alone = head(short[0][None], short[1][None], torch.ones(1, 4, dtype=torch.bool))
    m, h, mask = pad_batch([short[0].numpy(), long[0].numpy()], [short[1].numpy(), long[1].numpy()])
    # hidden has T + 1 rows (row 4 would be e_4; this cache has none, so it is zeros as alone)
    m[0, 4:], h[0, 5:] = math.nan, 1e6                           # garbage in the padding is ignored
    batched = head(m, h, mask)
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(batched).all()


def test_token_dropping_in_training_only():
    g = torch.Generator().manual_seed(3)
    m, h = random_doc(g, 40)
    m, h, mask = m[None], h[None], torch.ones(1, 40, dtype=torch.bool)
    head = make_head()
    eval_logit = head(m, h, mask)
    torch.testing.assert_close(head(m, h, mask), eval_logit)      # eval: deterministic
    head.train()
    torch.manual_seed(0)
    assert not torch.allclose(head(m, h, mask), eval_logit)       # 15% of tokens dropped
    # drop rate 1 would drop every token: the document keeps all of them instead
    full_drop = make_head(drop_rate=1.0)
    ref = full_drop(m, h, mask)
    full_drop.train()
    torch.testing.assert_close(full_drop(m, h, mask), ref)


def test_empty_document_and_predict_proba():
    head = make_head().train()
    m, h, mask = pad_batch([np.zeros((0, 5), np.float32), np.ones((2, 5), np.float32)],
                           [np.zeros((0, H), np.float32), np.ones((2, H), np.float32)])
    p = head.predict_proba(m, h, mask)
    assert head.training                                           # mode restored
    assert p.shape == (2,) and torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()


def test_pad_batch_truncates():
    m, h, mask = pad_batch([np.ones((7, 5)), np.ones((3, 5))], [np.ones((7, H)), np.ones((3, H))], max_tokens=5)
    assert m.shape == (2, 5, 5) and h.shape == (2, 6, H)  # hidden keeps e_T: T + 1 rows
    assert mask.sum(1).tolist() == [5, 3]
    assert h[0].sum(1).tolist() == [H] * 6 and h[1].sum(1).tolist() == [H] * 3 + [0] * 3


def test_label_smoothed_bce_by_hand():
    # logit 0, y = 1 → y' = 0.9: -(0.9 ln ½ + 0.1 ln ½) = ln 2
    assert bce_smoothed(torch.tensor([0.0]), torch.tensor([1.0]), 0.2).item() == pytest.approx(math.log(2))
    # logit ln 3 (σ = 3/4), y = 0 → y' = 0.1: -(0.1 ln ¾ + 0.9 ln ¼)
    got = bce_smoothed(torch.tensor([math.log(3)]), torch.tensor([0.0]), 0.2).item()
    assert got == pytest.approx(-(0.1 * math.log(0.75) + 0.9 * math.log(0.25)), rel=1e-6)


# ---------------------------------------------------------------------------- feature cache and training


def synthetic_features(n_docs: int = 64, seed: int = 0) -> pa.Table:
    """Separable features: machine-written docs are confident (high lp, low entropy)."""
    rng = np.random.default_rng(seed)
    metrics, hidden, labels = [], [], []
    for i in range(n_docs):
        y = i % 2
        t = int(rng.integers(3, 20))
        lp = rng.normal(-0.5 if y else -3.0, 0.5, t)
        ent = rng.normal(1.0 if y else 3.0, 0.5, t).clip(0)
        m = np.stack([ent, lp + rng.normal(0, 0.1, t), lp, rng.uniform(0, 0.01, t), rng.uniform(0, 1, t)], 1)
        metrics.append(m.astype(np.float32).tolist())
        hidden.append(rng.normal(0, 1, (t, H)).astype(np.float32).tolist())
        labels.append(y)
    f32 = pa.list_(pa.list_(pa.float32()))
    return pa.table({"metrics": pa.array(metrics, f32), "hidden": pa.array(hidden, f32),
                     "label": pa.array(labels, pa.int8())})


def test_read_features_schema(tmp_path):
    table = synthetic_features(4)
    metrics, hidden, labels = read_features(table)
    assert [m.shape[1] for m in metrics] == [5] * 4 and [h.shape[1] for h in hidden] == [H] * 4
    assert [len(m) for m in metrics] == [len(h) for h in hidden]
    np.testing.assert_array_equal(labels, [0, 1, 0, 1])
    np.testing.assert_allclose(metrics[1], np.array(table["metrics"][1].as_py(), np.float32))
    fixed = table.set_column(0, "metrics", table["metrics"].cast(pa.list_(pa.list_(pa.float32(), 5))))
    np.testing.assert_array_equal(read_features(fixed)[0][2], metrics[2])
    bad = table.set_column(2, "label", pa.array([0, 1, 2, 1], pa.int8()))
    with pytest.raises(ValueError):
        read_features(bad)


def test_training_separates_synthetic_features(tmp_path):
    table = synthetic_features()
    path = str(tmp_path / "features.parquet")
    pq.write_table(table, path)
    head, history = train_pawn(path, epochs=5, batch_size=16)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["accuracy"] > 0.9 and history[-1]["loss"] < history[0]["loss"]
    assert not head.training
    metrics, hidden, labels = read_features(table)
    p = head.predict_proba(*pad_batch(metrics, hidden))
    assert ((p > 0.5).float().numpy() == labels).mean() > 0.9
    # deterministic given the seed, from a path or a table alike
    _, again = train_pawn(table, epochs=1, batch_size=16)
    assert again[0] == pytest.approx(history[0])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_load_round_trip(tmp_path, where):
    head = make_head(seed=5)
    path = str(tmp_path / "pawn") if where == "local" else f"memory://{tmp_path.name}/pawn"
    save_pawn(head, path)
    with fsspec.open(f"{path}/config.json", "r") as f:
        assert json.load(f)["hidden_size"] == H
    back = load_pawn(path)
    assert not back.training and back.config == head.config
    g = torch.Generator().manual_seed(6)
    m, h = random_doc(g, 6)
    batch = (m[None], h[None], torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(back(*batch), head(*batch))
