"""Figures: axes that do not magnify noise."""

import pytest

from llmpq.evaluate.plots import QUALITY_MIN_SPAN, quality_limits


def test_identical_perplexities_do_not_look_different():
    lo, hi = quality_limits([24.080, 24.086, 24.083])
    assert hi - lo >= QUALITY_MIN_SPAN * 24.086
    assert lo < 24.080 and hi > 24.086


def test_real_differences_keep_their_scale():
    lo, hi = quality_limits([24.0, 48.0])
    assert hi - lo == pytest.approx(1.2 * 24.0)
    assert lo < 24.0 and hi > 48.0
