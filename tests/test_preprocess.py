"""Gradient preprocessing of Andrychowicz et al. (2016), Appendix A."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_l2l.nets.preprocess import PREPROCESSINGS, identity, log_sign, num_features, preprocess

E10 = math.exp(10.0)


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("kind, features", [("log_sign", 2), ("none", 1)])
def test_output_shape(n: int, kind: str, features: int) -> None:
    """A flat ``(n,)`` gradient gives ``(n, features)`` inputs, as ``num_features`` announces."""
    out = preprocess(torch.randn(n), kind)
    assert out.shape == (n, features)
    assert num_features(kind) == features


def test_zero_gradient() -> None:
    """g = 0 is below the threshold: ``(-1, e^p * 0) = (-1, 0)``."""
    assert_close(log_sign(_f64(0.0)), _f64(-1.0, 0.0).view(1, 2))


@pytest.mark.parametrize("g", [1e-6, -1e-6, 3e-5, -4.5e-5, 1e-30])
def test_tiny_gradient_uses_scaled_branch(g: float) -> None:
    """``|g| < e^-10`` maps to ``(-1, e^10 g)``, keeping the sign and magnitude in the 2nd feature."""
    assert abs(g) < math.exp(-10)
    out = log_sign(_f64(g))
    assert_close(out, _f64(-1.0, E10 * g).view(1, 2), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("g", [1e-3, -0.5, 1.0, 7.0, -1e30, 1e30])
def test_large_gradient_uses_log_branch(g: float) -> None:
    """``|g| >= e^-10`` maps to ``(log|g| / 10, sign g)``; huge values stay finite."""
    out = log_sign(_f64(g))
    assert_close(out, _f64(math.log(abs(g)) / 10.0, math.copysign(1.0, g)).view(1, 2), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(out).all()


def test_huge_float32_gradient() -> None:
    """1e30 in float32 gives ``(log(1e30)/10 ~ 6.9, 1)``: no overflow in the log branch."""
    out = log_sign(torch.tensor([1e30, -1e30]))
    expected = torch.tensor([[math.log(1e30) / 10, 1.0], [math.log(1e30) / 10, -1.0]])
    assert_close(out, expected)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_exactly_at_threshold(sign: float) -> None:
    """``|g| = e^-p`` belongs to the log branch (``>=``): ``(-1, sign g)``; just below, ``(-1, ~sign g)``."""
    at = log_sign(_f64(sign * math.exp(-10.0)))
    assert_close(at, _f64(-1.0, sign).view(1, 2), rtol=1e-12, atol=1e-12)
    below = math.nextafter(math.exp(-10.0), 0.0) * sign
    out = log_sign(_f64(below))
    assert out[0, 0].item() == -1.0  # the scaled branch's constant, exactly
    assert_close(out[0, 1], torch.tensor(E10 * below, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_threshold_float32() -> None:
    """In float32, ``e^-10`` rounded to float32 still takes the log branch (second feature exactly 1)."""
    out = log_sign(torch.tensor([math.exp(-10.0)], dtype=torch.float32))
    assert out[0, 1].item() == 1.0
    assert_close(out[0, 0], torch.tensor(-1.0))


def test_negative_values_have_sign_minus_one() -> None:
    """Negative gradients above the threshold give sign feature exactly -1."""
    out = log_sign(torch.tensor([-1e-4, -0.3, -2.0, -1e10]))
    assert (out[:, 1] == -1.0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_maps_to_zero_features(bad: float, dtype: torch.dtype) -> None:
    """NaN and +-inf map to the features of g = 0, ``(-1, 0)`` (documented); neighbours are unaffected."""
    out = log_sign(torch.tensor([bad, 1.0], dtype=dtype))
    assert_close(out[0], torch.tensor([-1.0, 0.0], dtype=dtype))
    assert_close(out[1], torch.tensor([0.0, 1.0], dtype=dtype))


def test_p_is_configurable() -> None:
    """With p = 5 the threshold is e^-5 and the log is divided by 5."""
    g = _f64(1e-3, -1e-3, 0.1, -2.0)  # e^-5 ~ 6.7e-3
    expected = torch.tensor(
        [
            [-1.0, math.exp(5) * 1e-3],
            [-1.0, -math.exp(5) * 1e-3],
            [math.log(0.1) / 5, 1.0],
            [math.log(2.0) / 5, -1.0],
        ],
        dtype=torch.float64,
    )
    assert_close(log_sign(g, p=5.0), expected, rtol=1e-12, atol=1e-15)
    assert_close(preprocess(g, "log_sign", p=5.0), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtypes_preserved(dtype: torch.dtype) -> None:
    """float32 and float64 inputs keep their dtype (float64 is not degraded to float32)."""
    g = torch.tensor([1e-12, 0.5], dtype=dtype)
    out = log_sign(g)
    assert out.dtype == dtype
    if dtype == torch.float64:
        # 1e-12 * e^10 needs float64 precision to match to 1e-15
        assert_close(out[0, 1], torch.tensor(1e-12 * E10, dtype=torch.float64), rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computed_in_float32(dtype: torch.dtype) -> None:
    """bfloat16/float16 gradients are preprocessed in float32: same numbers as the upcast input."""
    g = torch.tensor([3e-5, -2e-6, 0.0, 0.125, -3.0], dtype=dtype)
    out = log_sign(g)
    assert out.dtype == torch.float32
    assert_close(out, log_sign(g.float()), rtol=0.0, atol=0.0)
    # log(0.125)/10 is exact in float32 but not representable in bfloat16 to that precision
    assert out[3, 0].item() == pytest.approx(math.log(0.125) / 10, rel=1e-6)


def test_float32_under_bfloat16_autocast() -> None:
    """Preprocessing stays in float32 inside a bfloat16 autocast region."""
    g = torch.tensor([3e-5, 0.7, -2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = log_sign(g)
    assert out.dtype == torch.float32
    assert_close(out, log_sign(g), rtol=0.0, atol=0.0)


def test_gradient_through_preprocessing_is_finite() -> None:
    """The discarded log branch does not poison the backward pass at g = 0 or tiny g."""
    g = torch.tensor([0.0, 1e-8, -1e-8, 0.5], dtype=torch.float64, requires_grad=True)
    log_sign(g).sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()
    # d/dg of (-1 + e^10 g) is e^10 on the scaled branch, of (log|g|/10 + sign g) is 1/(10 g)
    assert_close(g.grad, _f64(E10, E10, E10, 1 / (10 * 0.5)), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_invalid_p_raises(p: float) -> None:
    """A non-positive p is rejected with a ValueError naming it."""
    with pytest.raises(ValueError, match="p"):
        log_sign(torch.ones(2), p=p)
    with pytest.raises(ValueError, match="p"):
        preprocess(torch.ones(2), "log_sign", p=p)


def test_nan_p_raises() -> None:
    """p = NaN is not a valid constant and must be rejected like p <= 0."""
    with pytest.raises(ValueError, match="p"):
        log_sign(torch.ones(2), p=math.nan)


def test_none_is_the_raw_gradient() -> None:
    """``preprocess(kind="none")`` is the raw gradient as one feature (non-finite entries set to 0)."""
    g = torch.tensor([0.5, -2.0, math.nan, math.inf, 1e-20])
    out = preprocess(g, kind="none")
    assert out.shape == (5, 1)
    assert_close(out[:, 0], torch.tensor([0.5, -2.0, 0.0, 0.0, 1e-20]))
    assert_close(identity(g), out)


def test_none_upcasts_low_precision() -> None:
    """The raw-gradient path also works in float32 for bfloat16 input, float64 stays float64."""
    assert preprocess(torch.ones(3, dtype=torch.bfloat16), "none").dtype == torch.float32
    assert preprocess(torch.ones(3, dtype=torch.float64), "none").dtype == torch.float64


@pytest.mark.parametrize("fn", [preprocess, lambda g, kind: num_features(kind)])
def test_unknown_name_lists_choices(fn) -> None:
    """An unknown preprocessing name raises ValueError naming it and every choice."""
    with pytest.raises(ValueError) as err:
        fn(torch.ones(2), kind="log")
    msg = str(err.value)
    assert "'log'" in msg
    for choice in PREPROCESSINGS:
        assert choice in msg
