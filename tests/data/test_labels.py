import math

import pytest

from cldr_dist.data.labels import (all_number_texts, caption, index_from_number_text, ln_ic50_from_y,
                                   number_index, number_text, y_from_ln_ic50)


def test_every_number_text_round_trips():
    texts = all_number_texts()
    assert len(texts) == len(set(texts)) == 1000
    for i, text in enumerate(texts):
        assert index_from_number_text(text) == i
        assert number_index(i / 1000) == i


def test_known_values():
    assert number_text(536) == "zero point five three six"
    assert number_text(0) == "zero point zero zero zero"
    assert number_text(999) == "zero point nine nine nine"
    assert y_from_ln_ic50(0.0) == 0.5
    assert y_from_ln_ic50(2.03) == pytest.approx(1 / (1 + math.exp(-0.203)))


def test_label_inverse_and_rounding():
    for ln in (-9.97, -1.0, 0.0, 2.03, 12.8):
        y = y_from_ln_ic50(ln)
        assert 0 < y < 1
        assert ln_ic50_from_y(y) == pytest.approx(ln)
        assert number_index(y) == round(y * 1000)
    assert number_index(0.9996) == 999  # would round to 1.000, which has no text


def test_caption_and_bad_index():
    assert caption("CCO", "MC-CAR") == "The drug response value between CCO and MC-CAR is "
    with pytest.raises(ValueError):
        number_text(1000)
