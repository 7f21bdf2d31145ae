"""OPD losses against brute-force references computed over the full vocabulary in float64."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from opd_client.losses import (LOG_EPS, dense_teacher_logprobs, forward_kl_topk_loss,  # noqa: E402
                               full_divergence_loss, generalized_jsd, jsd_topk_loss, reverse_kl_pg_loss,
                               token_logprobs)

V = 11


def _dists(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    student_logits_N_V = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    teacher_lp_N_V = torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, -1)
    return student_logits_N_V, teacher_lp_N_V


def _full_kl(lp: list[float], lq: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def test_reverse_kl_pg_gradient_expectation_is_the_full_reverse_kl_gradient():
    logits_N_V, teacher_N_V = _dists(0)
    for n in range(logits_N_V.shape[0]):
        # exact expectation over the student's own samples: one "sequence" per vocab token,
        # weighted by pi(y) through the mask (masked_mean divides by sum(pi) = 1)
        logits = logits_N_V[n].clone().requires_grad_(True)
        lp_V = torch.log_softmax(logits, -1)
        out = reverse_kl_pg_loss(lp_V[:, None], lp_V.detach()[:, None], teacher_N_V[n][:, None],
                                 lp_V.detach().exp()[:, None])
        (grad_pg,) = torch.autograd.grad(out.loss, logits)
        # brute force: d/dlogits KL(pi || p) over the whole vocabulary
        ref_logits = logits_N_V[n].clone().requires_grad_(True)
        lq = torch.log_softmax(ref_logits, -1)
        kl = (lq.exp() * (lq - teacher_N_V[n])).sum()
        (grad_ref,) = torch.autograd.grad(kl, ref_logits)
        assert torch.allclose(grad_pg.double(), grad_ref, atol=1e-5), (grad_pg, grad_ref)
        assert out.metrics["reverse_kl"] == pytest.approx(float(kl.detach()), rel=1e-4, abs=1e-6)
        assert out.metrics["ratio_mean"] == pytest.approx(1.0)


def test_reverse_kl_pg_stale_rollouts_are_clipped():
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    # ratios e^0.5 (> 1.2) and e^-0.5 (< 0.8); advantages + and -
    beh = torch.tensor([[-1.5, -0.5, -1.5, -0.5]])
    teacher = beh + torch.tensor([[1.0, -1.0, -1.0, 1.0]])      # advantage = teacher - behaviour
    out = reverse_kl_pg_loss(lp, beh, teacher, torch.ones(1, 4), clip_eps=0.2)
    (g,) = torch.autograd.grad(out.loss, lp)
    ratio = torch.exp(lp.detach() - beh)
    adv = teacher - beh
    # PPO pessimism: clipped (zero gradient) where ratio*A is beyond the clip in A's favour
    # [0]: r=1.65, A=+1 -> clipped; [1]: r=0.61, A=-1 -> clipped;
    # [2]: r=1.65, A=-1 -> unclipped; [3]: r=0.61, A=+1 -> unclipped
    want = -(ratio * adv) / 4
    want[0, 0] = want[0, 1] = 0.0
    assert torch.allclose(g, want, atol=1e-6)
    assert out.metrics["clip_frac"] == pytest.approx(1.0)
    # reverse KL estimate uses the behaviour logprobs of the sampled tokens
    assert out.metrics["reverse_kl"] == pytest.approx(float((beh - teacher).mean()))


def _bucketed(lp_V: list[float], ids: list[int]) -> list[float]:
    """Brute force: probabilities over [ids..., everything else], from full-vocab logprobs."""
    p = [math.exp(x) for x in lp_V]
    top = [p[i] for i in ids]
    return top + [sum(p[j] for j in range(len(p)) if j not in ids)]


@pytest.mark.parametrize("k", [1, 4, V])
def test_forward_kl_topk_matches_brute_force(k):
    logits_N_V, teacher_N_V = _dists(1)
    lq_N_V = torch.log_softmax(logits_N_V.clone().requires_grad_(True), -1)
    top_lp, top_ids = teacher_N_V.topk(k, -1)
    out = forward_kl_topk_loss(lq_N_V[None], top_ids[None], top_lp[None], torch.ones(1, lq_N_V.shape[0]))
    ref = []
    for n in range(lq_N_V.shape[0]):
        ids = top_ids[n].tolist()
        pb = _bucketed(teacher_N_V[n].tolist(), ids)
        qb = _bucketed(lq_N_V[n].tolist(), ids)
        ref.append(sum(a * math.log(a / b) for a, b in zip(pb, qb) if a > 0))
        if k == V:   # no tail: the full-vocabulary forward KL
            assert ref[-1] == pytest.approx(_full_kl(teacher_N_V[n].tolist(), lq_N_V[n].tolist()), abs=1e-9)
    assert float(out.loss.detach()) == pytest.approx(sum(ref) / len(ref), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k", [2, 5, V])
def test_forward_kl_topk_gradient_matches_brute_force(k):
    logits_N_V, teacher_N_V = _dists(2)
    top_lp, top_ids = teacher_N_V.topk(k, -1)
    x = logits_N_V.clone().requires_grad_(True)
    out = forward_kl_topk_loss(torch.log_softmax(x, -1)[None], top_ids[None], top_lp[None], torch.ones(1, x.shape[0]))
    (g,) = torch.autograd.grad(out.loss, x)
    # reference: bucket sums built with an explicit membership matrix, float64 autograd
    y = logits_N_V.clone().requires_grad_(True)
    q = torch.softmax(y, -1)
    p = teacher_N_V.exp()
    member = torch.zeros_like(p).scatter_(-1, top_ids, 1.0)
    pb = torch.cat([p.gather(-1, top_ids), ((1 - member) * p).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, top_ids), ((1 - member) * q).sum(-1, keepdim=True)], -1)
    ok = pb > 1e-12      # k = V: the tail bucket is empty on both sides and contributes nothing
    kl = torch.where(ok, pb * (torch.log(pb.clamp_min(1e-300)) - torch.log(qb.clamp_min(1e-300))),
                     torch.zeros_like(pb)).sum(-1).mean()
    (g_ref,) = torch.autograd.grad(kl, y)
    assert torch.allclose(g.double(), g_ref, atol=1e-5)


def _jsd_ref(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return (beta * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
            + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0))


@pytest.mark.parametrize("k,beta", [(1, 0.5), (4, 0.1), (4, 0.9), (V, 0.5), (V, 0.3)])
def test_jsd_topk_matches_brute_force(k, beta):
    logits_N_V, teacher_N_V = _dists(3)
    lq_N_V = torch.log_softmax(logits_N_V, -1)
    top_lp, top_ids = teacher_N_V.topk(k, -1)
    out = jsd_topk_loss(lq_N_V[None], top_ids[None], top_lp[None], torch.ones(1, lq_N_V.shape[0]), beta=beta)
    ref = []
    for n in range(lq_N_V.shape[0]):
        ids = top_ids[n].tolist()
        if k == V:   # the full-vocabulary definition, no buckets at all
            ref.append(_jsd_ref(teacher_N_V[n].exp().tolist(), lq_N_V[n].exp().tolist(), beta))
        else:
            ref.append(_jsd_ref(_bucketed(teacher_N_V[n].tolist(), ids), _bucketed(lq_N_V[n].tolist(), ids), beta))
    assert float(out.loss.detach()) == pytest.approx(sum(ref) / len(ref), rel=1e-5, abs=1e-7)


def test_jsd_symmetry_and_bounds():
    logits_N_V, teacher_N_V = _dists(4)
    lq = torch.log_softmax(logits_N_V, -1)
    a = generalized_jsd(teacher_N_V, lq, 0.3)
    b = generalized_jsd(lq, teacher_N_V, 0.7)
    assert torch.allclose(a, b)
    assert bool((a >= 0).all()) and bool((generalized_jsd(lq, lq, 0.5).abs() < 1e-12).all())
    assert bool((generalized_jsd(teacher_N_V, lq, 0.5) <= math.log(2) + 1e-9).all())
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(lq, lq, 1.0)


def test_mask_excludes_positions():
    logits_N_V, teacher_N_V = _dists(5, n=3)
    lq = torch.log_softmax(logits_N_V, -1)[None]
    top_lp, top_ids = teacher_N_V.topk(3, -1)
    full = forward_kl_topk_loss(lq, top_ids[None], top_lp[None], torch.tensor([[1, 1, 1]]))
    first = forward_kl_topk_loss(lq[:, :1], top_ids[None, :1], top_lp[None, :1], torch.tensor([[1]]))
    masked = forward_kl_topk_loss(lq, top_ids[None], top_lp[None], torch.tensor([[1, 0, 0]]))
    assert float(masked.loss) == pytest.approx(float(first.loss))
    assert float(masked.loss) != pytest.approx(float(full.loss))


def test_token_logprobs():
    logits = torch.randn(2, 3, V)
    ids = torch.randint(0, V, (2, 3))
    lp = token_logprobs(logits, ids)
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0])


def test_reverse_kl_pg_baseline_keeps_the_expected_gradient():
    logits_N_V, teacher_N_V = _dists(6)
    for n in range(logits_N_V.shape[0]):
        grads = []
        for baseline in (False, True):
            logits = logits_N_V[n].clone().requires_grad_(True)
            lp_V = torch.log_softmax(logits, -1)
            out = reverse_kl_pg_loss(lp_V[:, None], lp_V.detach()[:, None], teacher_N_V[n][:, None],
                                     lp_V.detach().exp()[:, None], baseline=baseline)
            grads.append(torch.autograd.grad(out.loss, logits)[0])
        assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reverse_kl_pg_normalise_rescales_the_step_only():
    """normalise divides by the advantages' std: the gradient's direction is kept (with the
    baseline, whose expectation is unchanged), its size is not."""
    logits_N_V, teacher_N_V = _dists(7)
    logits = logits_N_V[0].clone().requires_grad_(True)
    lp_V = torch.log_softmax(logits, -1)
    w = lp_V.detach().exp()[:, None]
    plain = reverse_kl_pg_loss(lp_V[:, None], lp_V.detach()[:, None], teacher_N_V[0][:, None], w, baseline=True)
    norm = reverse_kl_pg_loss(lp_V[:, None], lp_V.detach()[:, None], teacher_N_V[0][:, None], w, baseline=True,
                              normalise=True)
    (g1,) = torch.autograd.grad(plain.loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(norm.loss, logits)
    adv = -(lp_V.detach() - teacher_N_V[0])
    centred = adv - (adv * w[:, 0]).sum()
    std = float(((centred ** 2) * w[:, 0]).sum().sqrt())
    assert torch.allclose(g2 * std, g1, atol=1e-6)


def test_reverse_kl_pg_default_is_plain_importance_sampling():
    """The published recipe: no clipping, so a stale token's gradient is ratio * advantage."""
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    beh = torch.tensor([[-1.5, -0.5]])
    teacher = beh + torch.tensor([[1.0, -1.0]])
    out = reverse_kl_pg_loss(lp, beh, teacher, torch.ones(1, 2))
    (g,) = torch.autograd.grad(out.loss, lp)
    assert torch.allclose(g, -(torch.exp(lp.detach() - beh) * (teacher - beh)) / 2, atol=1e-6)
    assert out.metrics["clip_frac"] == 0.0


def _full_ref(kind: str, lp_V: torch.Tensor, lq_V: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Brute force in float64 over the whole vocabulary, with autograd through lq."""
    p, q = lp_V.exp(), lq_V.exp()
    if kind == "fkl":
        return (p * (lp_V - lq_V)).sum()
    if kind == "rkl":
        return (q * (lq_V - lp_V)).sum()
    m = beta * p + (1 - beta) * q
    return beta * (p * (lp_V - m.log())).sum() + (1 - beta) * (q * (lq_V - m.log())).sum()


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
def test_full_divergence_value_and_gradient_match_brute_force(kind, beta):
    logits_N_V, teacher_N_V = _dists(8)
    x = logits_N_V.clone().requires_grad_(True)
    top_lp, top_ids = teacher_N_V.topk(V, -1)            # the whole vocabulary, shuffled by rank
    dense = dense_teacher_logprobs(top_ids[None], top_lp[None], V)[0]
    assert torch.allclose(dense.double(), teacher_N_V, atol=1e-6)
    out = full_divergence_loss(torch.log_softmax(x, -1)[None], dense[None], torch.ones(1, x.shape[0]),
                               kind=kind, beta=beta)
    (g,) = torch.autograd.grad(out.loss, x)
    y = logits_N_V.clone().requires_grad_(True)
    lq = torch.log_softmax(y, -1)
    ref = torch.stack([_full_ref(kind, teacher_N_V[n], lq[n], beta) for n in range(y.shape[0])]).mean()
    (g_ref,) = torch.autograd.grad(ref, y)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    assert torch.allclose(g.double(), g_ref, atol=1e-5)


def test_full_reverse_kl_gradient_is_the_expected_sampled_token_gradient():
    """rkl-full is the analytic counterpart of the sampled-token PG loss: same expected gradient."""
    logits_N_V, teacher_N_V = _dists(9)
    for n in range(logits_N_V.shape[0]):
        x = logits_N_V[n].clone().requires_grad_(True)
        full = full_divergence_loss(torch.log_softmax(x, -1)[None, None], teacher_N_V[n][None, None],
                                    torch.ones(1, 1), kind="rkl")
        (g_full,) = torch.autograd.grad(full.loss, x)
        y = logits_N_V[n].clone().requires_grad_(True)
        lp_V = torch.log_softmax(y, -1)
        pg = reverse_kl_pg_loss(lp_V[:, None], lp_V.detach()[:, None], teacher_N_V[n][:, None],
                                lp_V.detach().exp()[:, None])
        (g_pg,) = torch.autograd.grad(pg.loss, y)
        assert torch.allclose(g_full.double(), g_pg.double(), atol=1e-5)


def test_dense_teacher_spreads_the_tail_over_the_ids_not_returned():
    _, teacher_N_V = _dists(10, n=2)
    top_lp, top_ids = teacher_N_V.topk(3, -1)
    dense = dense_teacher_logprobs(top_ids[None], top_lp[None], V)[0].double()
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(dense.gather(-1, top_ids), top_lp, atol=1e-6)
    rest = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, top_ids, False)
    tail = (1 - top_lp.exp().sum(-1)) / (V - 3)
    assert torch.allclose(dense[rest].view(2, V - 3).exp(), tail[:, None].expand(2, V - 3), atol=1e-6)
    # a teacher that returned all of its mass: the others get exp(LOG_EPS), no NaN
    one_hot = torch.tensor([[[0.0]]])
    assert float(dense_teacher_logprobs(torch.tensor([[[4]]]), one_hot, V)[0, 0, 0]) == pytest.approx(LOG_EPS - math.log(V - 1))


def test_full_divergence_rejects_an_unknown_kind():
    lq = torch.log_softmax(torch.randn(1, 1, V), -1)
    with pytest.raises(ValueError, match="kind"):
        full_divergence_loss(lq, lq, torch.ones(1, 1), kind="tvd")
