"""PAWN's gate reads h_{t+1}: with the engine keeping the last token's state, the last scored row's
h_{t+1} is the real e_n (also at a max_tokens cut), computed here by hand from HF hidden_states."""

from __future__ import annotations

import pytest
import torch

from operators.detection.head import build_head
from operators.detection.pawn import METRIC_NAMES, PawnConfig, PawnHead, pad_batch, save_pawn
from operators.lm.models import ModelSpec
from operators.lm.torch_engine import TorchEngine
from tests.operators.lm.tiny_lm import HIDDEN, TEXT, build_tiny_lm


def by_hand(head: PawnHead, m: torch.Tensor, e: torch.Tensor) -> float:
    """P = sigmoid(agg(Σ_t softmax_t(gate([e_t ‖ e_{t+1} ‖ t/512])) ⊙ metrics_nn(m_t))), t = 0 … T-1,
    for m [T,5] and e [T+1,H] (e_0 … e_T)."""
    T = m.shape[0]
    pos = (torch.arange(T, dtype=torch.float32) / 512).unsqueeze(-1)
    gate = head.gate_nn(torch.cat([e[:T], e[1:T + 1], pos], dim=-1))       # [T,W]
    s = (torch.softmax(gate, dim=0) * head.metrics_nn(m)).sum(0)          # [W]
    return torch.sigmoid(head.aggregate_nn(s)).item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pawn-last")
    engine = TorchEngine(ModelSpec(name="tiny", path=str(build_tiny_lm(root / "lm"))), max_tokens=64)
    torch.manual_seed(0)
    head = PawnHead(PawnConfig(hidden_size=HIDDEN)).eval()
    save_pawn(head, str(root / "pawn"))
    return engine, head, root / "pawn"


@pytest.mark.parametrize("max_tokens", [512, 4])
def test_pawn_gate_gets_the_real_next_state_of_the_last_row(setup, max_tokens):
    engine, head, path = setup
    lm_head = build_head({"path": str(path), "max_tokens": max_tokens}, engine.model_info())
    engine.add_taps(set(lm_head.layers))
    doc = engine.encode([TEXT])
    result = engine.score(doc, [lm_head])[0]
    with torch.inference_mode():
        e = engine.model(input_ids=torch.tensor([doc[0].ids]), output_hidden_states=True).hidden_states[-1][0]
    T = min(len(doc[0].ids) - 1, max_tokens)
    m = torch.stack([torch.from_numpy(result.metrics[k][:T]) for k in METRIC_NAMES], dim=-1)
    with torch.no_grad():
        expected = by_hand(head, m, e[:T + 1].float())
    assert result.heads["pawn_score"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_pad_batch_keeps_the_next_state_and_old_caches_get_zeros():
    m = [torch.ones(2, 5).numpy(), torch.ones(3, 5).numpy()]
    h = [torch.full((3, 4), 7.0).numpy(), torch.full((3, 4), 9.0).numpy()]  # doc 0: e_0..e_2; doc 1: old cache
    metrics, hidden, mask = pad_batch(m, h)
    assert metrics.shape == (2, 3, 5) and hidden.shape == (2, 4, 4)
    assert hidden[0, 2].tolist() == [7.0] * 4 and hidden[1, 3].tolist() == [0.0] * 4
    assert mask.tolist() == [[True, True, False], [True, True, True]]
