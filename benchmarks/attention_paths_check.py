"""GPU check: the attention fast paths give the reference path's outputs."""
import torch
from dwdp.models import attention as A
torch.manual_seed(0)
for name, (hq, hkv, d, dv) in {"gqa": (64, 4, 128, 128), "mla": (128, 128, 192, 128)}.items():
    for lens, pre in (([3000, 1000], [0, 0]), ([1000, 500], [2000, 0])):
        cu_q = [0, lens[0], sum(lens)]
        cu_k = [0, lens[0] + pre[0], sum(lens) + sum(pre)]
        q = torch.randn(sum(lens), hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(cu_k[-1], hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(cu_k[-1], hkv, dv, device="cuda", dtype=torch.bfloat16)
        A.set_cuda_attention_backend("auto")
        fast = A.packed_causal_attention(q, k, v, cu_q, cu_k, d ** -0.5)
        ref = A._sdpa_per_sequence(q.float(), k.float(), v.float(), cu_q, cu_k, d ** -0.5)
        err = (fast.float() - ref).abs().max().item() / ref.abs().max().item()
        print(f"{name} prefix={pre}: rel err vs fp32 reference {err:.4f}", "OK" if err < 2e-2 else "BAD")
