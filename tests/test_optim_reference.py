"""
The Muon step of MuonAdamW against a from-scratch reference written straight from the formulas
(as upstream nanochat computes them), one matrix at a time in plain tensor math and sharing no
code with nanochat/optim.py:
Nesterov momentum, Polar Express with its published coefficients, NorMuon's factored second
moment, cautious weight decay and the shape-based LR, over several steps; and the two options
of upstream 4e014d3: MuonEq row equilibration before the polar iteration, Muon+ renormalization
after it.
"""

import pytest
import torch

from nanochat.optim import MuonAdamW

# Polar Express, num_iters=5, safety 2e-2, cushion 2 (arXiv 2505.16932)
COEFFICIENTS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


class ReferenceMuon:
    """Per-matrix state: a momentum buffer and a factored second moment (per row if rows >= cols)."""

    def __init__(self, shape):
        rows, cols = shape
        self.momentum_buffer = torch.zeros(shape)
        self.second_moment = torch.zeros((rows, 1) if rows >= cols else (1, cols))

    def step(self, p, grad, lr, momentum, weight_decay, beta2=0.95, muon_eq=False, muon_plus=False, margin=1.02):
        rows, cols = p.shape
        # Nesterov: the buffer follows the grad, the update looks one step ahead along it
        self.momentum_buffer = momentum * self.momentum_buffer + (1 - momentum) * grad
        g = (1 - momentum) * grad + momentum * self.momentum_buffer
        if muon_eq:  # every row scaled to norm ||g||_F / sqrt(rows), the RMS of the row norms
            row_norms = torch.sqrt((g * g).sum(dim=1, keepdim=True))
            g = g * (torch.linalg.matrix_norm(g) / rows**0.5) / torch.clamp(row_norms, min=1e-6)
        # orthogonalize
        X = g / (torch.linalg.matrix_norm(g) * margin + 1e-6)
        for a, b, c in COEFFICIENTS:
            if rows > cols:
                A = X.T @ X
                X = a * X + X @ (b * A + c * A @ A)
            else:
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
        g = X
        if muon_plus:  # Frobenius norm set to sqrt(min(rows, cols)), that of a semi-orthogonal matrix
            g = g * min(rows, cols) ** 0.5 / torch.clamp(torch.linalg.matrix_norm(g), min=1e-6)
        # NorMuon: scale rows (or columns) by 1/sqrt of their running mean square, keep the norm
        reduce_dim = 1 if rows >= cols else 0
        mean_square = (g * g).mean(dim=reduce_dim, keepdim=True)
        self.second_moment = beta2 * self.second_moment + (1 - beta2) * mean_square
        scaled = g / torch.sqrt(torch.clamp(self.second_moment, min=1e-10))
        g = scaled * torch.linalg.matrix_norm(g) / torch.clamp(torch.linalg.matrix_norm(scaled), min=1e-10)
        # cautious weight decay, shape-based LR
        lr = lr * max(1.0, rows / cols) ** 0.5
        agree = (g * p) >= 0
        return p - lr * g - lr * weight_decay * p * agree


def run_against_reference(shape, count, **options):
    generator = torch.Generator().manual_seed(sum(shape) + count)
    start = [torch.randn(shape, generator=generator) * 0.5 for _ in range(count)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    group = dict(kind="muon", params=params, lr=0.03, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.2)
    optimizer = MuonAdamW([group], **options)
    references = [ReferenceMuon(shape) for _ in range(count)]
    expected = [p.clone() for p in start]
    for step in range(4):
        lr, momentum, weight_decay = 0.03 * (1 - 0.2 * step), 0.85 + 0.03 * step, 0.2 * (1 - step / 4)
        grads = [torch.randn(shape, generator=generator) for _ in range(count)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        group = optimizer.param_groups[0]
        group["lr"], group["momentum"], group["weight_decay"] = lr, momentum, weight_decay
        optimizer.step()
        reference_options = dict(options)
        if "polar_margin" in reference_options:
            reference_options["margin"] = reference_options.pop("polar_margin")
        expected = [ref.step(p, g, lr, momentum, weight_decay, **reference_options)
                    for ref, p, g in zip(references, expected, grads)]
    for p, want, p0 in zip(params, expected, start):
        assert (want - p0).abs().max() > 0.01  # it moved, by far more than the tolerance
        torch.testing.assert_close(p.detach(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape, count", [((8, 16), 2), ((16, 8), 3), ((8, 8), 1), ((32, 8), 2)])
def test_muon_steps_match_the_spec_reference(shape, count):
    run_against_reference(shape, count)


@pytest.mark.parametrize("options", [dict(muon_eq=True), dict(muon_plus=True),
                                     dict(muon_eq=True, muon_plus=True, polar_margin=1.01)])
@pytest.mark.parametrize("shape, count", [((8, 16), 2), ((32, 8), 2)])
def test_muoneq_and_muonplus_steps_match_the_reference(shape, count, options):
    run_against_reference(shape, count, **options)
