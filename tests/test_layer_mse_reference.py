"""The layer MSE reference (the spec) against gradcheck and independent formulations:
TinyBERT's own loop, TextBrewer's att_mse_loss / hid_mse_loss, and a Hugging Face BERT."""

import pytest
import torch
from conftest import cpu_backends
from layer_mse_checks import bert_scores, padding_mask
from oracles import textbrewer_losses

import kd_kernels as kdk

ALL_BACKENDS = [*cpu_backends(), "torch"]


def tinybert_att_loss(student_atts, teacher_atts):
    """TinyBERT's task_distill.py loop over mapped layers, verbatim in substance."""
    loss_mse = torch.nn.MSELoss()
    att_loss = 0.0
    for student_att, teacher_att in zip(student_atts, teacher_atts, strict=True):
        student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att), student_att)
        teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att), teacher_att)
        att_loss = att_loss + loss_mse(student_att, teacher_att)
    return att_loss


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_fp64(backend, masked):
    if backend not in ALL_BACKENDS:
        pytest.fail("the cpu backend (C++ extension) must be built for the test suite")
    mask = padding_mask(3, 5) if masked else None
    scores = [bert_scores(3, 2, 5, mask, torch.float64, at_threshold=False) for _ in range(4)]
    students, teachers = [s.requires_grad_() for s in scores[:2]], scores[2:]
    hidden_s = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    hidden_t = torch.randn(3, 5, 4, dtype=torch.float64)

    def losses(s0, s1, h):
        attention = kdk.attention_mse_loss(
            [s0, s1], teachers, attention_mask=mask, layer_reduction="none", backend=backend
        )
        hidden = kdk.hidden_mse_loss(h, hidden_t, attention_mask=mask, backend=backend)
        return attention, hidden

    assert torch.autograd.gradcheck(losses, (*students, hidden_s))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layers", [1, 4])
def test_equals_tinybert_loop_on_bert_scores(backend, layers):
    """No attention_mask: padded keys hold -10000 and the threshold zeroes them, as in TinyBERT."""
    mask = padding_mask(4, 16)
    students = [bert_scores(4, 3, 16, mask) for _ in range(layers)]
    teachers = [bert_scores(4, 3, 16, mask) for _ in range(layers)]
    expected = tinybert_att_loss(students, teachers)
    loss = kdk.attention_mse_loss(students, teachers, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_textbrewer_att_mse_loss(backend):
    losses = textbrewer_losses()
    mask = padding_mask(4, 10)
    student, teacher = bert_scores(4, 3, 10, mask), bert_scores(4, 3, 10, mask)
    # With a mask TextBrewer divides by sum over (b, h) of len_b^2 and keeps every value.
    expected = losses.att_mse_loss(student, teacher, mask=mask)
    loss = kdk.attention_mse_loss(
        student, teacher, attention_mask=mask, threshold=None, backend=backend
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Without a mask it zeroes entries <= -1e-3 (a threshold) and averages over all entries.
    expected = losses.att_mse_loss(student, teacher)
    loss = kdk.attention_mse_loss(student, teacher, threshold=-1e-3, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_equals_textbrewer_hid_mse_loss(backend, masked):
    losses = textbrewer_losses()
    mask = padding_mask(4, 10) if masked else None
    student, teacher = torch.randn(4, 10, 24), torch.randn(4, 10, 24)
    expected = losses.hid_mse_loss(student, teacher, mask=mask)
    loss = kdk.hidden_mse_loss(student, teacher, attention_mask=mask, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hugging_face_bert_layers(backend):
    """A 4-layer student against a 12-layer teacher's attentions and hidden states, mapped
    with layer_map, equals the per-layer PyTorch formulas (TextBrewer's with mask)."""
    transformers = pytest.importorskip("transformers")

    def bert(layers, seed):
        torch.manual_seed(seed)
        config = transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation="eager",
        )
        return transformers.BertModel(config).eval()

    input_ids = torch.randint(0, 100, (3, 12))
    mask = padding_mask(3, 12)
    kwargs = dict(attention_mask=mask, output_attentions=True, output_hidden_states=True)
    student_out, teacher_out = bert(4, 1)(input_ids, **kwargs), bert(12, 2)(input_ids, **kwargs)
    mapping = kdk.layer_map(4, 12)
    teacher_atts = [teacher_out.attentions[i] for i in mapping.attention]
    teacher_hidden = [teacher_out.hidden_states[i] for i in mapping.hidden]
    losses = textbrewer_losses()
    att = kdk.attention_mse_loss(
        student_out.attentions, teacher_atts, attention_mask=mask, backend=backend
    )
    hidden = kdk.hidden_mse_loss(
        student_out.hidden_states, teacher_hidden, attention_mask=mask, backend=backend
    )
    expected_att = sum(
        losses.att_mse_loss(s, t, mask=mask)
        for s, t in zip(student_out.attentions, teacher_atts, strict=True)
    )
    expected_hidden = sum(
        losses.hid_mse_loss(s, t, mask=mask)
        for s, t in zip(student_out.hidden_states, teacher_hidden, strict=True)
    )
    torch.testing.assert_close(att, expected_att, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-6)
