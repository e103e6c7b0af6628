"""Bad input gets a clear error naming the argument, before anything is computed or modified."""

import pytest
import torch

import marginfused as mf

from helpers import make_inputs


def good():
    x, w, y = make_inputs(4, 6, 5, seed=0)
    return x.float().requires_grad_(), w.float().requires_grad_(), y


def replace(**changes):
    """A case: the good inputs with some replaced. Builds (arguments, the caller's original tensors)."""

    def build():
        originals = good()
        arguments = dict(zip(("embeddings", "weight", "labels"), originals))
        for key, change in changes.items():
            arguments[key] = change(arguments.get(key))
        return arguments, originals

    return build


def with_label(index, value):
    def change(y):
        y = y.clone()
        y[index] = value
        return y

    return change


def with_value(index, value):
    def change(t):
        t = t.detach().clone()
        t.view(-1)[index] = value
        return t.requires_grad_()

    return change


CASES = {
    "label equal to C": (replace(labels=with_label(0, 6)), ValueError, r"labels must be in \[0, 6\).*got 6"),
    "negative label": (replace(labels=with_label(1, -5)), ValueError, "labels must be in.*got -5"),
    "1-D embeddings": (replace(embeddings=lambda x: x[0]), ValueError, "embeddings must be 2-D"),
    "3-D weight": (replace(weight=lambda w: w[None]), ValueError, "weight must be 2-D"),
    "2-D labels": (replace(labels=lambda y: y[:, None]), ValueError, "labels must be 1-D"),
    "mismatched D": (replace(weight=lambda w: w[:, :4]), ValueError, "weight must have the embedding dim"),
    "label count": (replace(labels=lambda y: y[:3]), ValueError, "labels must have one entry per embedding"),
    "empty batch": (replace(embeddings=lambda x: x[:0], labels=lambda y: y[:0]), ValueError, "embeddings must be non-empty"),
    "no classes": (replace(weight=lambda w: w[:0]), ValueError, "weight must have at least one class"),
    "weight on another device": (replace(weight=lambda w: w.to("meta")), ValueError, "weight is on meta"),
    "labels on another device": (replace(labels=lambda y: y.to("meta")), ValueError, "labels are on meta"),
    "integer embeddings": (replace(embeddings=lambda x: x.detach().long()), TypeError, "embeddings must be a floating"),
    "integer weight": (replace(weight=lambda w: w.detach().long()), TypeError, "weight must be a floating"),
    "mixed dtypes": (replace(weight=lambda w: w.double()), TypeError, "weight must have the dtype of embeddings"),
    "float labels": (replace(labels=lambda y: y.float()), TypeError, "labels must be an integer tensor"),
    "bool labels": (replace(labels=lambda y: y > 0), TypeError, "labels must be an integer tensor"),
    "list embeddings": (replace(embeddings=lambda x: x.tolist()), TypeError, "embeddings must be a torch.Tensor"),
    "NaN embedding": (replace(embeddings=with_value(3, float("nan"))), ValueError, "embeddings contain NaN or Inf"),
    "Inf embedding": (replace(embeddings=with_value(0, float("inf"))), ValueError, "embeddings contain NaN or Inf"),
    "NaN weight": (replace(weight=with_value(7, float("nan"))), ValueError, "weight contains NaN or Inf"),
    "unknown margin": (replace(margin=lambda _: "normface"), ValueError, "margin: unknown name"),
    "margin of a wrong type": (replace(margin=lambda _: 0.5), TypeError, "margin must be"),
    "scale zero": (replace(scale=lambda _: 0.0), ValueError, "scale must be finite and > 0"),
    "scale NaN": (replace(scale=lambda _: float("nan")), ValueError, "scale must be finite"),
    "scale a string": (replace(scale=lambda _: "64"), TypeError, "scale must be a real number"),
    "margin_grad": (replace(margin_grad=lambda _: "straight"), ValueError, "margin_grad must be one of"),
    "reduction": (replace(reduction=lambda _: "avg"), ValueError, "reduction must be one of"),
    "label_smoothing 1": (replace(label_smoothing=lambda _: 1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    "label_smoothing negative": (replace(label_smoothing=lambda _: -0.1), ValueError, "label_smoothing must be in"),
    "ignore_index float": (replace(ignore_index=lambda _: -100.0), TypeError, "ignore_index must be an int"),
    "unknown backend": (replace(backend=lambda _: "opencl"), ValueError, "backend must be one of"),
    "backend not a string": (replace(backend=lambda _: None), TypeError, "backend must be a string"),
    "backend not implemented": (replace(backend=lambda _: "cuda"), mf.BackendUnavailableError, "backend 'cuda' cannot run here: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_changes_nothing(case):
    build, error, message = CASES[case]
    arguments, originals = build()
    snapshot = [t.detach().clone() for t in originals]
    with pytest.raises(error, match=message):
        mf.margin_cross_entropy(**arguments)
    for original, before in zip(originals, snapshot):
        assert torch.equal(original.detach(), before)
        assert original.grad is None


def test_ignore_index_is_not_out_of_range():
    x, w, y = good()
    y[0] = -100
    assert torch.isfinite(mf.margin_cross_entropy(x, w, y))
