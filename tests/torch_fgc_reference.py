"""An independent PyTorch FGC training step, written from FGC_SPEC.md in the reference's style.

The oracle of the fidelity tests: the gated CIFAR ResNet with the reference's module names
(so the released `.pth` loads with `load_state_dict`), PyTorch's own BatchNorm, the
straight-through Gumbel gate with the uniform noise given from outside, L0, batch shaping
(SciPy's Beta CDF and pdf in float64), the FGC loss over the memory banks, the momentum
bank update and `torch.optim.SGD` with Nesterov momentum. It runs in float64 (the
oracle) or float32 (the reference's own float32 error). Nothing here comes from fgc_jax.
"""
from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F


class _StraightThrough(torch.autograd.Function):
    """Hard gate forward; d sigmoid(y) / d logits = s (1 - s) / tau backward.

    The forward value is `hard`: 1[y > 0], or the decisions imposed from outside.
    """

    @staticmethod
    def forward(ctx, logits, y, hard, tau):
        s = torch.sigmoid(y)
        ctx.save_for_backward(s)
        ctx.tau = tau
        return hard

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * s * (1 - s) / ctx.tau, None, None, None


class _GateMLP(nn.Module):
    def __init__(self, cin, cout, hidden=16):
        super().__init__()
        self.fc1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, cout, 1)

    def forward(self, x):
        pooled = x.mean((2, 3), keepdim=True)
        return self.fc2(F.relu(self.bn(self.fc1(pooled)))).flatten(1)


class _Gate(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.mlp = _GateMLP(cin, cout)


class _Block(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.gate = _Gate(cin, planes)
        self.pad = (planes - cin) // 2 if (stride != 1 or cin != planes) else None

    def forward(self, x, noise, tau, imposed=None):
        """Returns the block output and (logits, gate, feature, y, own decision 1[y > 0]).

        `imposed`: hard gates to use instead of this block's own decisions (the same
        [batch, channels] 0/1 values); `y` is the noisy logit / tau in training, the logit
        in evaluation.
        """
        h = F.relu(self.bn1(self.conv1(x)))
        feature = h.mean((2, 3)).detach()
        logits = self.gate.mlp(x)
        y = (logits + torch.log(noise) - torch.log1p(-noise)) / tau if self.training else logits
        own = (y > 0).to(logits.dtype).detach()
        hard = own if imposed is None else torch.as_tensor(np.asarray(imposed), dtype=logits.dtype)
        gate = _StraightThrough.apply(logits, y, hard, tau) if self.training else hard
        h = self.bn2(self.conv2(h * gate[:, :, None, None]))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(h + short), (logits, gate, feature, y.detach(), own)


class GatedResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with a gate on every block; returns logits and per-block gate info."""

    def __init__(self, depth=20, classes=10, tau=2 / 3):
        super().__init__()
        n = (depth - 2) // 6
        self.tau = tau
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, planes, stride if j == 0 else 1))
                cin = planes
            setattr(self, f"layer{stage + 1}", nn.ModuleList(blocks))
        self.linear = nn.Linear(64, classes)

    def blocks(self):
        return [b for s in (self.layer1, self.layer2, self.layer3) for b in s]

    def forward(self, x, noise=None, gates=None):
        """`gates`: per block, hard gates imposed instead of the model's own decisions."""
        x = F.relu(self.bn1(self.conv1(x)))
        info = []
        for i, block in enumerate(self.blocks()):
            x, block_info = block(x, None if noise is None else noise[i], self.tau,
                                  None if gates is None else gates[i])
            info.append(block_info)
        return self.linear(x.mean((2, 3))), info


class _BatchShaping(torch.autograd.Function):
    """sum_{i,c} (i/(N+1) - BetaCDF(x_(i)))^2 / N with the reference's gradient (spec §2)."""

    @staticmethod
    def forward(ctx, prob, alpha, beta):
        p = prob.detach().cpu().double().numpy()
        n = p.shape[0]
        order = np.argsort(p, axis=0, kind="stable")
        x = np.take_along_axis(p, order, axis=0)
        gap = np.arange(1, n + 1)[:, None] / (n + 1) - scipy.special.betainc(alpha, beta, x)
        pdf = scipy.stats.beta.pdf(x, alpha, beta)
        pdf[~np.isfinite(pdf)] = 0.0
        grad = np.zeros_like(p)
        np.put_along_axis(grad, order, -2.0 * pdf * gap / n, axis=0)
        ctx.save_for_backward(torch.as_tensor(grad, dtype=prob.dtype))
        return torch.as_tensor(np.sum(gap ** 2) / n, dtype=prob.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def fgc_loss(logits, feature, index, feature_bank, gate_bank, k, temperature, use_neighbours,
             imposed_neighbours=None):
    """-mean_b log(sum_{j in P_b} softmax(a G^T / T)_bj + 1e-7), P_b = {idx_b} ∪ top-k_b.

    Returns the loss and, with `use_neighbours`, the similarities [batch, rows] and this
    loss's own top-k rows; `imposed_neighbours` [batch, k] replace the latter in P_b.
    """
    positives = torch.zeros(logits.shape[0], gate_bank.shape[0], dtype=torch.bool)
    rows = torch.arange(logits.shape[0])
    positives[rows, index] = True
    sims = own = None
    if use_neighbours:
        sims = feature @ feature_bank.T
        sims[rows, index] = -2.0
        own = sims.topk(k, dim=1).indices
        chosen = own if imposed_neighbours is None else torch.as_tensor(np.asarray(imposed_neighbours)).long()
        positives[rows[:, None], chosen] = True
    q = torch.softmax(logits @ gate_bank.T / temperature, dim=1)
    return -torch.log((q * positives).sum(1) + 1e-7).mean(), sims, own


def updated_bank(bank, index, values, momentum):
    v = momentum * bank[index] + (1 - momentum) * values
    out = bank.clone()
    out[index] = v / v.norm(dim=1, keepdim=True)
    return out


class ReferenceRun:
    """A model, its optimizer and the FGC banks, stepped as the reference trains (spec §2-§3)."""

    def __init__(self, state_dict, banks, dtype, *, lr, weight_decay=5e-4, momentum=0.9,
                 momentum_buffers=None):
        """`banks`: {block: (feature_bank, gate_bank)} as NumPy arrays [N, C].

        `state_dict` may leave out BN's `num_batches_tracked` (unused with BN momentum 0.1);
        `momentum_buffers` ({parameter name: array}) start the SGD momentum where a run
        stands, so the reference steps from any state of another implementation.
        """
        self.dtype = dtype
        self.model = GatedResNet().to(dtype)
        own = self.model.state_dict()
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(state_dict[k]) if k in state_dict else own[k])
                                    for k in own})
        self.banks = {b: tuple(torch.as_tensor(np.asarray(x), dtype=dtype) for x in pair)
                      for b, pair in banks.items()}
        named = list(self.model.named_parameters())
        self.optimizer = torch.optim.SGD(
            [{"params": [p for n, p in named if ".gate." not in n], "weight_decay": weight_decay},
             {"params": [p for n, p in named if ".gate." in n], "weight_decay": 0.0}],
            lr=lr, momentum=momentum, nesterov=True)
        for name, p in named:
            if momentum_buffers is not None:
                self.optimizer.state[p]["momentum_buffer"] = torch.as_tensor(
                    np.asarray(momentum_buffers[name]), dtype=dtype).clone()

    def step(self, images, labels, index, noise, *, rho, zeta, kappa, k=200, temperature=0.07,
             bank_momentum=0.5, use_neighbours=True, gates=None, neighbours=None):
        """One training step on NCHW `images`; returns the loss terms and the decisions.

        `gates` (per block [batch, channels]) and `neighbours` ({block: [batch, k] rows})
        impose another implementation's hard decisions. The decisions dict holds, per block,
        this step's own `gate` 1[y > 0], its `y` and the gate `logit`, and per FGC block its own
        `neighbours` and the `similarity` [batch, rows] they were chosen by.
        """
        self.model.train()
        as_tensor = lambda x: torch.as_tensor(np.asarray(x), dtype=self.dtype)  # noqa: E731
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        logits, info = self.model(as_tensor(images), [as_tensor(u) for u in noise], gates)
        terms = {"cross_entropy": F.cross_entropy(logits, torch.as_tensor(np.asarray(labels)).long())}
        probs = [torch.sigmoid(a) for a, *_ in info]
        terms["l0"] = sum(p.sum() for p in probs) / sum(p.numel() for p in probs)
        terms["batch_shaping"] = sum(_BatchShaping.apply(p, 0.6, 0.4) for p in probs)
        terms["fgc"] = torch.zeros((), dtype=self.dtype)
        decisions = {"gate": [own.numpy() for *_, own in info], "y": [y.double().numpy() for *_, y, _ in info],
                     "logit": [a.detach().double().numpy() for a, *_ in info], "neighbours": {}, "similarity": {}}
        for b, (feature_bank, gate_bank) in self.banks.items():
            a, _, f, _, _ = info[b]
            term, sims, own = fgc_loss(a, f, index, feature_bank, gate_bank, k, temperature, use_neighbours,
                                       None if neighbours is None else neighbours[b])
            terms["fgc"] = terms["fgc"] + term
            if use_neighbours:
                decisions["neighbours"][b] = own.numpy()
                decisions["similarity"][b] = sims.double().numpy()
        loss = terms["cross_entropy"] + rho * terms["l0"] + zeta * terms["batch_shaping"] + kappa * terms["fgc"]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if kappa:
            for b, (feature_bank, gate_bank) in self.banks.items():
                a, _, f, _, _ = info[b]
                self.banks[b] = (updated_bank(feature_bank, index, f, bank_momentum),
                                 updated_bank(gate_bank, index, a.detach(), bank_momentum))
        used = [g.detach() for _, g, *_ in info]
        density = sum(g.sum() for g in used) / sum(g.numel() for g in used)  # pooled (spec §6)
        return {name: float(v) for name, v in dict(terms, loss=loss, gate_density=density).items()}, decisions

    def momentum_buffers(self):
        """{parameter name: SGD momentum buffer}: after the first step, gradient + L2 term."""
        return {name: self.optimizer.state[p]["momentum_buffer"].double().numpy()
                for name, p in self.model.named_parameters()}

    def state(self):
        return {name: t.detach().double().numpy() for name, t in self.model.state_dict().items()}

    def evaluate(self, images, gates=None):
        """Eval-mode logits, own deterministic gates 1[logit > 0] and gate logits (running BN
        statistics); `gates` imposes another implementation's decisions."""
        self.model.eval()
        with torch.no_grad():
            logits, info = self.model(torch.as_tensor(np.asarray(images), dtype=self.dtype), gates=gates)
        return (logits.double().numpy(), [own.double().numpy() for *_, own in info],
                [y.double().numpy() for *_, y, _ in info])
