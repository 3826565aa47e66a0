"""``model/token_choice.py``: coordinates chosen by the probability of a window of values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros.model.tiny import build_tokenizer
from qwen3vl_seg_ros.model.token_choice import COORD_MAX, NumberTokens, number_tokens, pick_tokens, window_mass

VOCAB = 1100  # tokens 0..1000 are the values, 1001.. other words


def numbers(window: int) -> NumberTokens:
    return NumberTokens(torch.arange(COORD_MAX + 1), window)


def logits_of(probs: dict[int, float]) -> torch.Tensor:
    """Logits whose softmax puts ``probs`` on those tokens and spreads the rest over words 1001..1099."""
    p = torch.full((VOCAB,), 0.0, dtype=torch.float64)
    for token, value in probs.items():
        p[token] = value
    rest = 1.0 - sum(probs.values())
    p[1001 + 50:] += rest / (VOCAB - 1051)
    return torch.log(p.clamp_min(1e-30)).float()[None]


@pytest.mark.parametrize("window", [0, 1, 7])
def test_window_mass_sums_each_neighbourhood(window: int) -> None:
    probs = torch.rand(3, COORD_MAX + 1, dtype=torch.float64)
    got = window_mass(probs, window)
    kernel = np.ones(2 * window + 1)
    for row in range(3):
        expected = np.convolve(probs[row].numpy(), kernel, mode="same")
        np.testing.assert_allclose(got[row].numpy(), expected, rtol=1e-9, atol=1e-9)


def test_triangular_weights_fall_off_from_the_centre() -> None:
    probs = torch.zeros(1, COORD_MAX + 1, dtype=torch.float64)
    probs[0, 500] = 1.0
    got = window_mass(probs, 3, triangular=True)[0]
    assert got[497:504].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25])
    assert got.sum().item() == pytest.approx(4.0)


def test_a_lone_peak_is_written_as_it_is() -> None:
    """A model sure of one value gets that value back, not the first value whose window holds it."""
    token, prob = pick_tokens(logits_of({100: 0.9, 1002: 0.05}), numbers(5))
    assert token.item() == 100 and prob.item() == pytest.approx(0.9, abs=1e-4)


def test_spread_numbers_beat_a_stray_word() -> None:
    """Greedy writes the word (0.05 against 0.04 for each number); the numbers hold 0.6 in all and the
    values 298..302 most of it, so the window rule writes 300."""
    belief = {298: 0.04, 299: 0.04, 300: 0.04, 301: 0.04, 302: 0.04, 700: 0.04}
    belief.update({v: 0.02 for v in range(400, 418)})  # a flat shelf: 0.36, no two values close
    logits = logits_of({**belief, 1005: 0.05})
    greedy, _ = pick_tokens(logits, None)
    assert greedy.item() == 1005
    token, prob = pick_tokens(logits, numbers(2))
    assert token.item() == 300 and prob.item() == pytest.approx(0.20, abs=1e-4)  # 298..302
    token, prob = pick_tokens(logits, numbers(0))
    assert token.item() in (298, 299, 300, 301, 302, 700) and prob.item() == pytest.approx(0.04, abs=1e-4)


def test_a_likelier_word_is_kept() -> None:
    """Numbers that together weigh less than the best other token do not win: that token is written."""
    logits = logits_of({300: 0.1, 301: 0.1, 1002: 0.3})
    token, prob = pick_tokens(logits, numbers(5))
    assert token.item() == 1002 and prob.item() == pytest.approx(0.3, abs=1e-4)


def test_number_tokens_of_the_task_tokenizer() -> None:
    tok = build_tokenizer()
    found = number_tokens(tok, 4)
    assert found is not None and found.window == 4 and len(found.ids) == COORD_MAX + 1
    assert tok.convert_ids_to_tokens(found.ids[[0, 7, 1000]].tolist()) == ["0", "7", "1000"]
    with pytest.raises(ValueError, match="window"):
        number_tokens(tok, -2)


def test_no_grouping_where_numbers_are_not_single_tokens() -> None:
    """The real Qwen tokenizer writes digits one by one; a vocabulary without "1000" gets greedy."""

    class Digits:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token: str) -> int:
            return int(token) + 1 if len(token) == 1 else self.unk_token_id

    assert number_tokens(Digits(), 3) is None
