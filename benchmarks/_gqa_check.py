import torch, time
from torch.nn.attention.varlen import varlen_attn
from dwdp.ceilings import time_cuda
from dwdp.models.attention import _causal_kwargs
T=16384; lens=[4096]*4
cu=torch.tensor([0,4096,8192,12288,16384],dtype=torch.int32,device='cuda')
q=torch.randn(T,64,128,device='cuda',dtype=torch.bfloat16); k=torch.randn(T,4,128,device='cuda',dtype=torch.bfloat16); v=torch.randn_like(k)
kw=_causal_kwargs()
try:
    o1=varlen_attn(q,k,v,cu,cu,4096,4096,scale=128**-0.5,**kw)
    o1=o1[0] if isinstance(o1,tuple) else o1
    kr=k.repeat_interleave(16,1); vr=v.repeat_interleave(16,1)
    o2=varlen_attn(q,kr,vr,cu,cu,4096,4096,scale=128**-0.5,**kw); o2=o2[0] if isinstance(o2,tuple) else o2
    print('gqa native ok, max diff', (o1.float()-o2.float()).abs().max().item())
    t1=time_cuda(lambda: varlen_attn(q,k,v,cu,cu,4096,4096,scale=128**-0.5,**kw))
    t2=time_cuda(lambda: varlen_attn(q,k.repeat_interleave(16,1),v.repeat_interleave(16,1),cu,cu,4096,4096,scale=128**-0.5,**kw))
    fl=2*4*(4096*4097/2)*64*256
    print(f'native {t1*1e3:.2f} ms {fl/t1/1e12:.0f} TF; repeated {t2*1e3:.2f} ms {fl/t2/1e12:.0f} TF')
except Exception as e:
    print('gqa native failed:', type(e).__name__, str(e)[:300])
# MLA: d=192 v=128 padded vs sdpa
q=torch.randn(T,128,192,device='cuda',dtype=torch.bfloat16); k=torch.randn_like(q); v=torch.randn(T,128,128,device='cuda',dtype=torch.bfloat16)
try:
    t3=time_cuda(lambda: varlen_attn(q,k,v,cu,cu,4096,4096,scale=192**-0.5,**kw))
    print(f'mla unpadded {t3*1e3:.2f} ms')
except Exception as e:
    print('mla unpadded failed:', type(e).__name__, str(e)[:200])
import torch.nn.functional as F
qq=q[:4096].transpose(0,1)[None]; kk=k[:4096].transpose(0,1)[None]; vv=v[:4096].transpose(0,1)[None]
t4=time_cuda(lambda: F.scaled_dot_product_attention(qq,kk,vv,is_causal=True))
print(f'sdpa mla one 4096 seq {t4*1e3:.2f} ms x4 = {4*t4*1e3:.2f}')
