"""An independent, deliberately naive MGG written straight from the published equations:
one coordinate and one head at a time, plain vector ops, float64. Used to check the vectorised
reference (and through it the kernels) on shapes the parity vectors do not cover."""

import torch


def _ln(z, gamma, beta, eps=1e-6):
    mu = z.mean()
    s = torch.sqrt(((z - mu) ** 2).mean() + eps)
    return gamma * (z - mu) / s + beta, (z - mu) / s, s


def naive_mgg_coordinate(x, W, b, sd, num_heads):
    """x [2]; W [nh,f,f]; b [nh,f]; sd: MGG state_dict (our names). Returns (out, W', b')."""
    H = sd["q_proj.weight"].shape[0]
    f = H // num_heads
    q_all = sd["q_proj.weight"] @ x
    k_all = sd["k_proj.weight"] @ x
    v_all = sd["v_proj.weight"] @ x
    tau = sd["learnable_token_idx"][0]
    heads, W_out, b_out = [], [], []
    for h in range(num_heads):
        sl = slice(h * f, (h + 1) * f)
        q, k, v = q_all[sl], k_all[sl], v_all[sl]
        gamma, beta = sd["ttt_norm_weight"][h], sd["ttt_norm_bias"][h]
        gate = torch.sigmoid(sd["learnable_ttt_lr_weight"][h, 0] @ x + sd["learnable_ttt_lr_bias"][h, 0])
        eta = max(float(1 + tau), 0.0) * gate / f
        Z = k @ W[h] + b[h]
        y, zh, s = _ln(Z, gamma, beta)
        e = (y - (v - k)) * gamma
        G = (f * e - e.sum() - zh * (e * zh).sum()) / (f * s)
        W_new = W[h] - eta * torch.outer(k, G)
        b_new = b[h] - eta * G
        Zbar = q @ W_new + b_new
        heads.append(q + _ln(Zbar, gamma, beta)[0])
        W_out.append(W_new)
        b_out.append(b_new)
    u = torch.cat(heads)
    p, _, _ = _ln(u, sd["post_norm.weight"], sd["post_norm.bias"])
    out = torch.tanh(sd["o_proj.weight"][0] @ p)
    return out, torch.stack(W_out), torch.stack(b_out)


def naive_mgg(x, W, b, sd, num_heads):
    """Loop :func:`naive_mgg_coordinate` over every coordinate of x [N, 2]."""
    outs, Ws, bs = [], [], []
    for i in range(x.shape[0]):
        o, Wn, bn = naive_mgg_coordinate(x[i], W[i], b[i], sd, num_heads)
        outs.append(o)
        Ws.append(Wn)
        bs.append(bn)
    return torch.stack(outs), torch.stack(Ws), torch.stack(bs)


def naive_optimizer_step(params, grads, m, v, step, W, b, sd, num_heads, lr, beta1, beta2, eps):
    """One published MGTTA step on lists of float64 tensors, coordinate by coordinate."""
    g = torch.cat([x.reshape(-1) for x in grads])
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    m_hat = m / (1 - beta1 ** (step + 1))
    v_hat = v / (1 - beta2 ** (step + 1))
    x = torch.stack([m_hat / (v_hat.sqrt() + eps), g / (v_hat.sqrt() + eps)], dim=-1)
    out, W_new, b_new = naive_mgg(x, W, b, sd, num_heads)
    flat = torch.cat([p.reshape(-1) for p in params]) - lr * out
    new_params = [
        c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
    ]
    return new_params, W_new, b_new
