"""attention_mse_loss / hidden_mse_loss: every backend against reference.py, fwd and bwd,
over shape x dtype x threshold x mask x layers x layer_reduction, plus the one-launch rule."""

import pytest
import torch
from conftest import DTYPES, cpu_backends, device_for
from layer_mse_checks import assert_layers_match_reference, bert_scores, padding_mask

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = cpu_backends()
# (B, H, L): 1x1x1x1, odd lengths around the block sizes, and a 130-key row (2 column chunks
# at a 128 block).
ATTENTION_SHAPES = [(1, 1, 1), (2, 3, 5), (3, 2, 33), (3, 4, 130)]
# (B, L, D): D = 1030 needs two column chunks of the Triton kernel.
HIDDEN_SHAPES = [(1, 1, 1), (2, 5, 7), (3, 17, 65), (3, 9, 1030)]


def attention_layers(batch, heads, length, layers, masked, dtype, device):
    mask = padding_mask(batch, length, device) if masked else None
    students = [bert_scores(batch, heads, length, mask, dtype, device) for _ in range(layers)]
    teachers = [bert_scores(batch, heads, length, mask, dtype, device) for _ in range(layers)]
    return students, teachers, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [-100.0, None])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_attention_matches_reference(backend, dtype, threshold, masked, layers, shape):
    device = device_for(backend)
    students, teachers, mask = attention_layers(*shape, layers, masked, dtype, device)
    assert_layers_match_reference(
        "attention",
        backend,
        students,
        teachers,
        attention_mask=mask,
        threshold=threshold,
        layer_reduction="none",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=str)
def test_hidden_matches_reference(backend, dtype, masked, layers, shape):
    device = device_for(backend)
    batch, length, _ = shape
    mask = padding_mask(batch, length, device) if masked else None
    students = [torch.randn(shape).to(device, dtype) for _ in range(layers)]
    teachers = [torch.randn(shape).to(device, dtype) for _ in range(layers)]
    assert_layers_match_reference(
        "hidden", backend, students, teachers, attention_mask=mask, layer_reduction="none"
    )


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("layer_reduction", reference.LAYER_REDUCTIONS)
@pytest.mark.parametrize("loss_name", ["attention", "hidden"])
def test_layer_reductions(backend, layer_reduction, loss_name):
    device = device_for(backend)
    mask = padding_mask(3, 12, device)
    if loss_name == "attention":
        students, teachers, _ = attention_layers(3, 2, 12, 3, True, torch.float32, device)
    else:
        students = [torch.randn(3, 12, 10, device=device) for _ in range(3)]
        teachers = [torch.randn(3, 12, 10, device=device) for _ in range(3)]
    loss, _ = assert_layers_match_reference(
        loss_name, backend, students, teachers, attention_mask=mask, layer_reduction=layer_reduction
    )
    per_layer = kdk.attention_mse_loss if loss_name == "attention" else kdk.hidden_mse_loss
    layer_losses = per_layer(
        students, teachers, attention_mask=mask, layer_reduction="none", backend=backend
    )
    expected = {"sum": layer_losses.sum(), "mean": layer_losses.mean(), "none": layer_losses}
    torch.testing.assert_close(loss, expected[layer_reduction])
    assert layer_losses.shape == (3,) and bool((layer_losses > 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + ["torch"])
def test_fp64_on_cpu_and_torch_matches_reference(backend):
    mask = padding_mask(3, 9)
    students, teachers, _ = attention_layers(3, 2, 9, 2, True, torch.float64, "cpu")
    assert_layers_match_reference(
        "attention", backend, students, teachers, attention_mask=mask, layer_reduction="none"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_of_different_shapes_in_one_call(backend):
    """Pairs must match, layers need not: (B, H, L, L) layers with different heads."""
    device = device_for(backend)
    students = [bert_scores(2, heads, 6, device=device) for heads in (1, 3, 3, 2)]
    teachers = [bert_scores(2, heads, 6, device=device) for heads in (1, 3, 3, 2)]
    mask = padding_mask(2, 6, device)
    assert_layers_match_reference(
        "attention", backend, students, teachers, attention_mask=mask, layer_reduction="none"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Head slices, transposed maps and a broadcast (stride-0) teacher work unchanged."""
    device = device_for(backend)
    full = bert_scores(2, 6, 9, device=device)
    head_slice = full[:, ::2]
    transposed = bert_scores(2, 3, 9, device=device).transpose(-1, -2)
    broadcast = bert_scores(2, 1, 9, device=device).expand(2, 3, 9, 9)
    assert not head_slice.is_contiguous() and not transposed.is_contiguous()
    mask = padding_mask(2, 9, device)
    assert_layers_match_reference(
        "attention",
        backend,
        [head_slice, transposed],
        [broadcast, head_slice],
        attention_mask=mask,
        layer_reduction="none",
    )
    hidden = torch.randn(3, 11, 2 * 20, device=device)[:, :, ::2]
    assert_layers_match_reference(
        "hidden", backend, [hidden], [torch.randn(11, 3, 20, device=device).transpose(0, 1)]
    )


def test_four_layers_are_one_triton_launch_per_pass(monkeypatch):
    if "triton" not in kdk.available_backends():
        pytest.skip("no triton backend on this machine")
    from kd_kernels.triton import layer_mse as triton_layer_mse

    launches = []
    kernel = triton_layer_mse._layer_mse_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_layer_mse, "_layer_mse_kernel", CountingKernel())
    device = device_for("triton")
    for layers in (1, 4):
        launches.clear()
        students, teachers, mask = attention_layers(2, 2, 8, layers, True, torch.float32, device)
        students = [s.requires_grad_() for s in students]
        loss = kdk.attention_mse_loss(students, teachers, attention_mask=mask, backend="triton")
        assert len(launches) == 1, f"forward of {layers} layers took {len(launches)} launches"
        loss.backward()
        assert len(launches) == 2, f"backward of {layers} layers took {len(launches) - 1}"
        assert all(grid[1] == layers for grid in launches)  # program axis 1 walks the layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    students = [torch.randn(2, 3, 5, 5, device=device, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(2, 3, 5, 5, device=device) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    if backend == "triton":
        from kd_kernels.triton import layer_mse as triton_layer_mse

        forward = triton_layer_mse.layer_mse_forward_triton
        backward = triton_layer_mse.layer_mse_backward_triton
    else:
        forward = torch.ops.kd_kernels.layer_mse_forward
        backward = torch.ops.kd_kernels.layer_mse_backward
    detached = [s.detach() for s in students]
    for options in ((mask, -1.0, True), (None, None, False)):
        torch.library.opcheck(forward, (students, teachers, *options))
        grad_rows = torch.rand(2 * 3 * 5 * 2, device=device)
        torch.library.opcheck(backward, (grad_rows, detached, teachers, *options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = device_for(backend)
    torch._dynamo.reset()

    def step(students, teachers, hidden_s, hidden_t, mask):
        attention = kdk.attention_mse_loss(students, teachers, attention_mask=mask, backend=backend)
        hidden = kdk.hidden_mse_loss(hidden_s, hidden_t, attention_mask=mask, backend=backend)
        return attention + hidden

    students, teachers, mask = attention_layers(2, 2, 7, 2, True, torch.float32, device)
    students = [s.requires_grad_() for s in students]
    hidden_s = [torch.randn(2, 7, 12, device=device, requires_grad=True) for _ in range(3)]
    hidden_t = [torch.randn(2, 7, 12, device=device) for _ in range(3)]
    inputs = (students, teachers, hidden_s, hidden_t, mask)
    loss = torch.compile(step, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(loss, students + hidden_s)
    expected = step(*inputs)
    expected_grads = torch.autograd.grad(expected, students + hidden_s)
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
