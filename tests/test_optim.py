import numpy as np
import pytest

from tinynorm.nn import Linear, Sequential
from tinynorm.optim import SGD, LRSchedule


def test_schedules_hit_their_end_points():
    lin = LRSchedule("linear", 0.01, 100, final=1e-5)
    assert lin(0) == pytest.approx(0.01) and lin(100) == pytest.approx(1e-5)
    assert lin(50) == pytest.approx((0.01 + 1e-5) / 2)
    poly = LRSchedule("poly", 0.1, 100, final=0.0, power=2)
    assert poly(50) == pytest.approx(0.1 * 0.25) and poly(100) == 0.0
    warm = LRSchedule("constant", 0.1, 100, warmup=10)
    assert warm(0) == pytest.approx(0.01) and warm(9) == pytest.approx(0.1) and warm(50) == 0.1


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule("cosine", 0.1, 10)
    with pytest.raises(ValueError, match="positive finite"):
        LRSchedule("linear", float("nan"), 10)


def test_sgd_momentum_and_decay_match_hand_computation():
    layer = Linear(3, 2, bias=True, rng=np.random.default_rng(0), dtype=np.float64)
    model = Sequential(layer)
    w0, b0 = layer.params["w"].copy(), layer.params["b"].copy()
    gw, gb = np.full_like(w0, 0.5), np.full_like(b0, -1.0)
    opt = SGD(model, LRSchedule("constant", 0.1, 10), momentum=0.9, weight_decay=0.01)
    vw, vb = np.zeros_like(w0), np.zeros_like(b0)
    w, b = w0.copy(), b0.copy()
    for _ in range(3):
        layer.grads["w"], layer.grads["b"] = gw, gb
        opt.step()
        vw = 0.9 * vw - 0.1 * (gw + 0.01 * w)
        vb = 0.9 * vb - 0.1 * gb          # biases get no weight decay
        w, b = w + vw, b + vb
    np.testing.assert_allclose(layer.params["w"], w, rtol=1e-14)
    np.testing.assert_allclose(layer.params["b"], b, rtol=1e-14)
    assert opt.iteration == 3
