"""00: why a mixture of experts? Total against active parameters, and where the layer sits.

What it teaches: an MoE layer replaces the feed-forward block of a transformer layer
(x + FFN(norm(x)) becomes x + MoE(norm(x)); the residual carries a token whose choices were all
dropped). It holds E experts but runs only K of them per token (sparse activation), so the
parameters it stores grow with E while the compute per token grows with K. The arithmetic below
counts both, for the walkthrough's toy layer and for two published models, from their published
configurations (hidden sizes, expert counts, layer counts); nothing is downloaded.

Run:  python examples/00_why.py
"""

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class MoEModel:
    """A decoder's sizes, as its published configuration gives them."""
    name: str
    d_model: int  # D
    d_expert: int  # H of one routed expert
    num_experts: int  # E routed experts per MoE layer
    k: int  # K routed experts per token
    moe_layers: int
    ffn_mats: int  # weight matrices per FFN: 2 (W1, W2) or 3 (SwiGLU: gate, up, down)
    shared_experts: int = 0  # always-on experts per MoE layer (DeepSeek)
    other_params: int = 0  # attention, embeddings, norms, dense FFN layers: always active
    source: str = ""

    def expert_params(self) -> int:
        """One expert: ffn_mats matrices of D x H (biases are absent in both published models)."""
        return self.ffn_mats * self.d_model * self.d_expert

    def router_params(self) -> int:
        return self.moe_layers * self.d_model * self.num_experts

    def total(self) -> int:
        per_layer = (self.num_experts + self.shared_experts) * self.expert_params()
        return self.moe_layers * per_layer + self.router_params() + self.other_params

    def active(self) -> int:
        per_layer = (self.k + self.shared_experts) * self.expert_params()
        return self.moe_layers * per_layer + self.router_params() + self.other_params


def mixtral_8x7b() -> MoEModel:
    """Mixtral-8x7B (Jiang et al. 2024; its config.json): D=4096, expert H=14336 (SwiGLU), 8 experts,
    top-2, 32 layers, grouped-query attention with 32 query and 8 key/value heads of 128, untied
    32000-token embeddings."""
    D, layers, vocab, head, q_heads, kv_heads = 4096, 32, 32000, 128, 32, 8
    attention = D * q_heads * head * 2 + D * kv_heads * head * 2  # Wq, Wo, Wk, Wv
    norms = layers * 2 * D + D
    other = layers * attention + 2 * vocab * D + norms
    return MoEModel("Mixtral-8x7B", D, 14336, 8, 2, layers, 3, other_params=other,
                    source="config: hidden 4096, intermediate 14336, 8 experts, top-2, 32 layers")


def deepseek_v3() -> MoEModel:
    """DeepSeek-V3 (DeepSeek-AI 2024; its config.json, without the multi-token-prediction module):
    D=7168, 61 layers of which the first 3 have a dense FFN (H=18432) and 58 an MoE of 256 routed
    experts (H=2048, top-8) plus 1 shared expert; multi-head latent attention with 128 heads
    (q rank 1536, kv rank 512, qk dims 128+64, v dim 128); untied 129280-token embeddings."""
    D, layers, dense_layers, vocab, heads = 7168, 61, 3, 129280, 128
    q_rank, kv_rank, nope, rope, v_dim = 1536, 512, 128, 64, 128
    attention = (D * q_rank + q_rank * heads * (nope + rope)  # W_q down, up
                 + D * (kv_rank + rope) + kv_rank * heads * (nope + v_dim)  # W_kv down, up
                 + heads * v_dim * D  # W_o
                 + q_rank + kv_rank)  # the two latent norms
    dense_ffn = dense_layers * 3 * D * 18432
    norms = layers * 2 * D + D
    other = layers * attention + dense_ffn + 2 * vocab * D + norms
    return MoEModel("DeepSeek-V3", D, 2048, 256, 8, layers - dense_layers, 3, shared_experts=1,
                    other_params=other,
                    source="config: hidden 7168, moe intermediate 2048, 256 routed + 1 shared, "
                           "top-8, 58 MoE layers")


def walkthrough_layer() -> dict[str, int]:
    """The layer of examples/01_walkthrough.py: D=6, H=8, E=4, K=2, two-layer experts with biases."""
    D, H, E, K = 6, 8, 4, 2
    expert = D * H + H + H * D + D  # w1, b1, w2, b2
    router = D * E + E  # w_router, b_router
    return {"D": D, "H": H, "E": E, "K": K, "expert": expert, "router": router,
            "total": E * expert + router, "active": K * expert + router}


def billions(n: int) -> str:
    return f"{n / 1e9:.1f}B"


def main(argv: "list[str] | None" = None) -> dict:  # quoted: Python 3.9
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="accepted for symmetry (it is instant)")
    ap.add_argument("--out", default="pymoe-out", help="unused (no pictures)")
    ap.parse_args(argv)

    print("Where the layer sits: a transformer layer is  h = x + Attention(norm(x));  "
          "y = h + FFN(norm(h)).")
    print("An MoE layer replaces the FFN:  y = h + sum_j gate_j * expert_{e_j}(norm(h)), "
          "over the K chosen experts.\n")

    w = walkthrough_layer()
    print(f"The walkthrough's layer (D={w['D']}, H={w['H']}, E={w['E']}, K={w['K']}): one expert "
          f"= D*H + H + H*D + D = {w['expert']} parameters, router = D*E + E = {w['router']}")
    print(f"  total  = E*{w['expert']} + {w['router']} = {w['total']} parameters stored")
    print(f"  active = K*{w['expert']} + {w['router']} = {w['active']} parameters used per token "
          f"({w['active'] / w['total']:.0%})")
    print("  A dense FFN with the same stored parameters would cost every token "
          f"{w['total'] / w['active']:.1f}x the compute; one with the same compute stores "
          f"{w['active']} parameters.\n")

    models = [mixtral_8x7b(), deepseek_v3()]
    print(f"{'model':14s} {'one expert':>11s} {'experts/layer':>14s} {'total':>8s} "
          f"{'active':>8s} {'active share':>13s}")
    for m in models:
        per_layer = f"{m.num_experts}+{m.shared_experts}" if m.shared_experts else str(m.num_experts)
        print(f"{m.name:14s} {m.expert_params() / 1e6:9.1f}M {per_layer:>14s} "
              f"{billions(m.total()):>8s} {billions(m.active()):>8s} "
              f"{m.active() / m.total():13.1%}")
    for m in models:
        shared = f" + {m.shared_experts} shared" if m.shared_experts else ""
        print(f"  {m.name}: {m.source}.")
        print(f"    experts: {m.moe_layers} layers x ({m.num_experts}{shared}) x {m.ffn_mats}*D*H "
              f"= {billions(m.moe_layers * (m.num_experts + m.shared_experts) * m.expert_params())};"
              f" always active (attention, embeddings, norms, dense layers, routers): "
              f"{billions(m.other_params + m.router_params())}")
        print(f"    per token: {m.k}{shared} expert(s) of {m.num_experts} run, so active = "
              f"{billions(m.active())} of {billions(m.total())}")
    print("\nThe price of sparsity is routing: choosing experts, moving tokens to them and back, "
          "and keeping their loads even. The other examples show each step.")
    return {"walkthrough": w, "models": {m.name: {"total": m.total(), "active": m.active()}
                                         for m in models}}


if __name__ == "__main__":
    main()
