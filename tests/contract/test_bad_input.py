"""Bad input raises ValueError/TypeError naming the argument, with what was expected and what came."""
import numpy as np
import pytest

import pymoe

LOGITS = np.zeros((4, 3))


def layer(**kw):
    args = dict(d_model=4, d_hidden=5, num_experts=3, k=2)
    args.update(kw)
    return pymoe.MoELayer(**args)


def test_logits_wrong_ndim():
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-D array .*got shape \(3,\)"):
        pymoe.route(np.zeros(3), 1)
    with pytest.raises(ValueError, match=r"router_logits: expected a 2-D"):
        pymoe.route(np.zeros((2, 3, 4)), 1)


def test_logits_without_experts():
    with pytest.raises(ValueError, match=r"router_logits: expected at least one expert"):
        pymoe.route(np.zeros((4, 0)), 1)


def test_x_wrong_ndim():
    with pytest.raises(ValueError, match=r"x: expected at least 1 dimension"):
        layer().forward(np.float32(1.0))


def test_x_model_dim_mismatch():
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 4\] \(D = d_model\), got \(2, 5\)"):
        layer().forward(np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one(k):
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\], got"):
        pymoe.route(LOGITS, k)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\]"):
        layer(k=k)


def test_k_above_num_experts():
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\], got 4"):
        pymoe.route(LOGITS, 4)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\], got 4"):
        layer(k=4)


@pytest.mark.parametrize("k", [1.0, True, "2"])
def test_k_not_an_int(k):
    with pytest.raises(TypeError, match=r"k: expected an int"):
        pymoe.route(LOGITS, k)


@pytest.mark.parametrize("cf", [0.0, -1.25])
def test_capacity_factor_not_positive(cf):
    with pytest.raises(ValueError, match=r"capacity_factor: expected a finite value > 0"):
        pymoe.route(LOGITS, 1, cf)
    with pytest.raises(ValueError, match=r"capacity_factor"):
        layer(capacity_factor=cf)


@pytest.mark.parametrize("cf", [np.inf, np.nan])
def test_capacity_factor_not_finite(cf):
    with pytest.raises(ValueError, match=r"capacity_factor: expected a finite value > 0, got"):
        pymoe.route(LOGITS, 1, cf)


def test_capacity_factor_wrong_type():
    with pytest.raises(TypeError, match=r"capacity_factor: expected a positive float or None"):
        pymoe.route(LOGITS, 1, "1.25")


def test_negative_min_capacity():
    with pytest.raises(ValueError, match=r"min_capacity: expected an int in \[0, inf\], got -1"):
        pymoe.route(LOGITS, 1, min_capacity=-1)
    with pytest.raises(ValueError, match=r"min_capacity"):
        layer(min_capacity=-2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits(bad):
    logits = LOGITS.copy()
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=r"router_logits: expected finite values, got 1 NaN/inf entry"):
        pymoe.route(logits, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_x(bad):
    x = np.zeros((3, 4), np.float32)
    x[0, 0] = bad
    with pytest.raises(ValueError, match=r"x: expected finite values"):
        layer().forward(x)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex128])
def test_non_float_logits(dtype):
    with pytest.raises(TypeError, match=r"router_logits: expected dtype float16, float32 or float64, got"):
        pymoe.route(LOGITS.astype(dtype), 1)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_non_float_x(dtype):
    with pytest.raises(TypeError, match=r"x: expected dtype float16, float32 or float64"):
        layer().forward(np.zeros((2, 4), dtype))


def test_x_not_an_array():
    with pytest.raises(TypeError, match=r"x: expected a floating-point numpy array, got str"):
        layer().forward("tokens")


def test_unknown_priority():
    with pytest.raises(ValueError, match=r"priority: expected one of 'choice', 'score', 'token', "
                                         r"'random', got 'first'"):
        pymoe.route(LOGITS, 1, priority="first")
    with pytest.raises(ValueError, match=r"priority"):
        layer(priority="tokens")


def test_unknown_activation():
    with pytest.raises(ValueError,
                       match=r"activation: expected one of 'relu', 'gelu', .*'swiglu'.*, got 'swish'"):
        layer(activation="swish")


def test_unknown_formulation_and_backend():
    with pytest.raises(ValueError, match=r"formulation: expected one of 'indexed', 'dense'"):
        layer(formulation="sparse")
    with pytest.raises(ValueError, match=r"backend: expected one of 'auto', 'numpy'"):
        layer(backend="fortran")


def test_dense_formulation_is_numpy_only():
    with pytest.raises(ValueError, match=r"backend: the dense formulation runs in NumPy only"):
        layer(formulation="dense", backend="c")


def test_non_float_layer_dtype():
    with pytest.raises(TypeError, match=r"dtype: expected float16, float32 or float64, got int32"):
        layer(dtype=np.int32)


def test_normalize_not_bool():
    with pytest.raises(TypeError, match=r"normalize: expected a bool, got str"):
        pymoe.route(LOGITS, 1, normalize="yes")


def test_backward_before_forward():
    with pytest.raises(ValueError, match=r"backward: called before forward\(\)"):
        layer().backward(np.zeros((2, 4), np.float32))


def test_dy_wrong_shape():
    m = layer()
    m.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \[2, 4\], got \(3, 4\)"):
        m.backward(np.zeros((3, 4), np.float32))


def test_dy_not_float():
    m = layer()
    m.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match=r"dy: expected dtype float16, float32 or float64"):
        m.backward(np.zeros((2, 4), np.int64))


def test_route_backward_wrong_dgate_shape():
    r = pymoe.route(LOGITS, 2)
    with pytest.raises(ValueError, match=r"dgate: expected a 2-D array \[4, 2\], got shape \(4,\)"):
        pymoe.route_backward(r, np.zeros(4))
    with pytest.raises(ValueError, match=r"dgate: expected shape \[4, 2\], got \(4, 3\)"):
        pymoe.route_backward(r, np.zeros((4, 3)))


def test_negative_loss_coefficients():
    with pytest.raises(ValueError, match=r"aux_loss_coef: expected a finite value >= 0, got -0.1"):
        layer(aux_loss_coef=-0.1)
    with pytest.raises(ValueError, match=r"z_loss_coef: expected a finite value >= 0, got nan"):
        layer(z_loss_coef=float("nan"))


def test_jitter_eps_out_of_range():
    with pytest.raises(ValueError, match=r"jitter_eps: expected a value in \[0, 1\), got 1.5"):
        layer(jitter_eps=1.5)


def test_layer_sizes_must_be_positive_ints():
    with pytest.raises(ValueError, match=r"d_model: expected an int in \[1, inf\], got 0"):
        layer(d_model=0)
    with pytest.raises(TypeError, match=r"num_experts: expected an int, got float"):
        layer(num_experts=3.0)


def test_route_backward_needs_a_routing():
    with pytest.raises(TypeError, match=r"routing: expected a pymoe.Routing from route\(\), got str"):
        pymoe.route_backward("x", np.zeros((4, 2)))


def test_expert_capacity_checks_its_arguments():
    from pymoe.capacity import expert_capacity

    with pytest.raises(ValueError, match=r"num_experts: expected an int in \[1, inf\], got 0"):
        expert_capacity(10, 0, 1, 1.0)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 4\], got 5"):
        expert_capacity(10, 4, 5, 1.0)
    with pytest.raises(ValueError, match=r"capacity_factor: expected a finite value > 0"):
        expert_capacity(10, 4, 1, float("inf"))
