"""TF-style clip_by_value / clip_by_norm / clip_by_global_norm against a plain numpy reference.

The references follow TensorFlow's own source (``tensorflow/python/ops/clip_ops.py``):
``clip_by_norm`` is ``t * clip_norm / maximum(l2norm(t), clip_norm)``; ``clip_by_global_norm``
computes ``scale = clip_norm * minimum(1 / use_norm, 1 / clip_norm) + (use_norm - use_norm)``,
so a non-finite global norm turns every output into NaN, and ``None`` entries pass through.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradguard as gg


def np_clip_by_value(t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.minimum(np.maximum(t, lo), hi)


def np_clip_by_norm(t: np.ndarray, clip_norm: float) -> np.ndarray:
    l2sum = float(np.sum(t * t))
    l2norm = math.sqrt(l2sum) if l2sum > 0 else l2sum
    return t * clip_norm / max(l2norm, clip_norm)


def np_clip_by_global_norm(
    t_list: list[np.ndarray | None], clip_norm: float, use_norm: float | None = None
) -> tuple[list[np.ndarray | None], float]:
    if use_norm is None:
        use_norm = math.sqrt(sum(float(np.sum(t * t)) for t in t_list if t is not None))
    # 1 / a subnormal use_norm overflows to inf, which is the right answer of the min() below.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = clip_norm * min(np.float64(1.0) / use_norm, 1.0 / clip_norm) + (
            np.float64(use_norm) - use_norm
        )
    return [None if t is None else t * scale for t in t_list], use_norm


def _arrays(seed: int, shapes: list[tuple[int, ...]], scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s) * scale) for s in shapes]


SHAPES = st.lists(st.lists(st.integers(0, 5), max_size=3).map(tuple), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    lo=st.floats(-3, 3),
    width=st.floats(0, 3),
)
def test_clip_by_value_matches_numpy_and_is_out_of_place(seed, shape, lo, width):
    (a,) = _arrays(seed, [shape], 2.0)
    t = torch.from_numpy(a)
    before = t.clone()
    out = gg.clip_by_value(t, lo, lo + width)
    np.testing.assert_array_equal(out.numpy(), np_clip_by_value(a, lo, lo + width))
    torch.testing.assert_close(t, before, rtol=0, atol=0)


def test_clip_by_value_keeps_nan_and_takes_tensor_bounds():
    t = torch.tensor([-5.0, math.nan, 0.5, math.inf])
    out = gg.clip_by_value(t, -1.0, 1.0)
    assert out[0] == -1.0 and out[1].isnan() and out[2] == 0.5 and out[3] == 1.0
    lo, hi = torch.tensor([-1.0, -2.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.25, 9.0])
    out = gg.clip_by_value(torch.tensor([-5.0, 5.0, 0.5, 3.0]), lo, hi)
    assert out.tolist() == [-1.0, 2.0, 0.25, 3.0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    clip_norm=st.floats(0.01, 10.0),
)
def test_clip_by_norm_matches_numpy(seed, shape, scale, clip_norm):
    (a,) = _arrays(seed, [shape], scale)
    t = torch.from_numpy(a)
    before = t.clone()
    out = gg.clip_by_norm(t, clip_norm)
    np.testing.assert_allclose(out.numpy(), np_clip_by_norm(a, clip_norm), rtol=1e-12, atol=0)
    assert out.dtype == t.dtype
    torch.testing.assert_close(t, before, rtol=0, atol=0)
    out32 = gg.clip_by_norm(t.float(), clip_norm)
    np.testing.assert_allclose(out32.numpy(), np_clip_by_norm(a, clip_norm), rtol=1e-5, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shapes=SHAPES,
    none_mask=st.lists(st.booleans(), min_size=5, max_size=5),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    clip_norm=st.floats(0.01, 10.0),
    use_norm=st.one_of(st.none(), st.floats(0.0, 50.0), st.sampled_from([math.inf, math.nan])),
)
# Found by a random run: the oracle's 1 / use_norm overflowed on a subnormal use_norm.
@example(
    seed=0,
    shapes=[(2,)],
    none_mask=[False] * 5,
    scale=1.0,
    clip_norm=1.0,
    use_norm=2.2250738585e-313,
)
@example(seed=0, shapes=[(2,)], none_mask=[False] * 5, scale=1.0, clip_norm=1.0, use_norm=5e-324)
def test_clip_by_global_norm_matches_numpy(seed, shapes, none_mask, scale, clip_norm, use_norm):
    arrays = _arrays(seed, shapes, scale)
    t_list: list[np.ndarray | None] = [
        None if none_mask[i] and i > 0 else a for i, a in enumerate(arrays)
    ]
    tensors = [None if a is None else torch.from_numpy(a) for a in t_list]
    before = [None if t is None else t.clone() for t in tensors]
    out, norm = gg.clip_by_global_norm(tensors, clip_norm, use_norm)
    expected, expected_norm = np_clip_by_global_norm(t_list, clip_norm, use_norm)
    assert isinstance(out, list) and len(out) == len(tensors)
    np.testing.assert_allclose(norm.numpy(), expected_norm, rtol=1e-12, equal_nan=True)
    for o, e, t, b in zip(out, expected, tensors, before):
        if e is None:
            assert o is None and t is None
            continue
        assert o is not None and t is not None and b is not None
        np.testing.assert_allclose(o.numpy(), e, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(t, b, rtol=0, atol=0)  # out of place
        if use_norm is not None and not math.isfinite(use_norm):
            assert o.isnan().all()


def test_nonfinite_gradient_makes_every_output_nan():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([math.inf]), None, torch.tensor([3.0])]
    out, norm = gg.clip_by_global_norm(tensors, 1.0)
    assert norm.isinf()
    assert out[2] is None
    for o in (out[0], out[1], out[3]):
        assert o is not None and o.isnan().all()


def test_use_norm_skips_the_norm_and_zero_norm_keeps_zeros():
    t = [torch.tensor([3.0, 4.0])]
    out, norm = gg.clip_by_global_norm(t, 1.0, use_norm=torch.tensor(10.0))
    assert norm.item() == 10.0
    torch.testing.assert_close(out[0], torch.tensor([0.3, 0.4]))
    out, norm = gg.clip_by_global_norm([torch.zeros(3)], 2.0)
    assert norm.item() == 0.0 and out[0] is not None and (out[0] == 0).all()
    out, norm = gg.clip_by_global_norm([], 1.0)
    assert out == [] and norm.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_global_norm_is_fp32_and_outputs_keep_dtype(dtype):
    tensors = [torch.full((100,), 0.3, dtype=dtype), torch.full((50,), -0.7, dtype=dtype)]
    out, norm = gg.clip_by_global_norm(tensors, 0.5)
    assert norm.dtype == torch.float32
    ref = math.sqrt(100 * float(tensors[0][0]) ** 2 + 50 * float(tensors[1][0]) ** 2)
    assert norm.item() == pytest.approx(ref, rel=1e-6)
    for o in out:
        assert o is not None and o.dtype == dtype
    assert gg.get_total_norm([o for o in out if o is not None]).item() == pytest.approx(
        0.5, rel=1e-2
    )


# --- clip_by_value: TF's shape and dtype rules (tensorflow/python/kernel_tests/clip_ops_test.py)


def test_clip_by_value_refuses_a_bound_that_would_enlarge_the_tensor():
    # TF's testClipByValueBadShape: a (2,) bound on a (2, 3, 1) tensor raises ValueError; plain
    # broadcasting would return shape (2, 3, 2).
    x = torch.tensor([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape(2, 3, 1)
    clip = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"\(2, 3, 2\)"):
        gg.clip_by_value(x, -clip, clip)
    with pytest.raises(ValueError, match="broadcast"):
        gg.clip_by_value(x, 1.0, clip)
    # Bounds that broadcast without enlarging t are fine (TF: a scalar or t's own shape).
    out = gg.clip_by_value(x, torch.tensor(-1.0), torch.full((3, 1), 4.4))
    assert out.shape == x.shape and out.max() == pytest.approx(4.4)


INT_DTYPES = [torch.int16, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, *INT_DTYPES])
def test_clip_by_value_keeps_the_dtype_like_tf(dtype):
    # TF's testClipByValue0Type .. 3Type: scalar and tensor bounds, every dtype kept.
    x = torch.tensor([1, 2, 3, 4, 5, 6], dtype=dtype).reshape(2, 3)
    cases = [
        (2, 4, [[2, 2, 3], [4, 4, 4]]),
        (torch.tensor([2, 2, 2, 3, 3, 3], dtype=dtype).reshape(2, 3), 4, [[2, 2, 3], [4, 4, 4]]),
        (4, torch.full((2, 3), 6, dtype=dtype), [[4, 4, 4], [4, 5, 6]]),
        (
            torch.tensor([2, 2, 2, 5, 5, 5], dtype=dtype).reshape(2, 3),
            torch.tensor([5, 5, 5, 7, 7, 7], dtype=dtype).reshape(2, 3),
            [[2, 2, 3], [5, 5, 6]],
        ),
    ]
    for lo, hi, want in cases:
        out = gg.clip_by_value(x, lo, hi)
        assert out.dtype == dtype, (lo, hi)
        assert out.tolist() == want


def test_clip_by_value_integer_tensors_refuse_floating_bounds_and_take_wide_ones():
    x = torch.tensor([0, 100, 255], dtype=torch.uint8)
    with pytest.raises(TypeError, match="int"):
        gg.clip_by_value(x, 0.5, 3.0)
    with pytest.raises(TypeError, match="floating"):
        gg.clip_by_value(x, torch.tensor(0.5), 3)
    # A bound beyond the dtype's range acts like its end (torch would refuse the number).
    assert gg.clip_by_value(x, -1, 300).tolist() == [0, 100, 255]
    assert gg.clip_by_value(torch.tensor([-(2**62), 2**62]), -(2**70), 5).tolist() == [-(2**62), 5]


def test_clip_by_value_rounds_a_wide_bound_to_the_dtype_like_tf():
    # 1e10 is inf in fp16, as TF's conversion makes it; torch's clamp refuses the number.
    x = torch.tensor([-math.inf, -3.0, 7.0, math.inf], dtype=torch.float16)
    out = gg.clip_by_value(x, -1e10, 1e10)
    assert out.dtype == torch.float16 and out.tolist() == [-math.inf, -3.0, 7.0, math.inf]
    out = gg.clip_by_value(torch.tensor([math.inf, 1.0]), 0.0, 1e39)  # above fp32's range
    assert out.tolist() == [math.inf, 1.0]
    with pytest.raises(ValueError, match="clip_value_min must be <="):
        gg.clip_by_value(x, 2.0, 1.0)
