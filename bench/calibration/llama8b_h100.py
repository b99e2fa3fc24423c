"""Measure prefill and decode step times of a model of Llama-3.1-8B's shape on the lent GPU.

Random bf16 weights (no download: the machine is offline) in the exact shapes of
Llama-3.1-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocab 128256. Each layer is what a vLLM forward pass computes: fused QKV, rotary
(approximated by an elementwise op of the same memory traffic), SDPA attention with
grouped KV heads, output projection, fused gate/up SiLU MLP, down projection, RMSNorm.
Decode steps run under CUDA graphs, as vLLM runs them, so Python overhead is out.
Prints JSON: prefill ms by prompt tokens, decode step ms by (batch, context).

    python3 bench/calibration/llama8b_h100.py > calibration.json   # on the GPU machine
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

H, NH, KVH, D, MLP, LAYERS, VOCAB = 4096, 32, 8, 128, 14336, 32, 128256
dev = torch.device("cuda")
dt = torch.bfloat16
torch.manual_seed(0)


class Layer:
    def __init__(self) -> None:
        s = 0.02
        self.qkv = torch.randn(H, (NH + 2 * KVH) * D, device=dev, dtype=dt) * s
        self.o = torch.randn(NH * D, H, device=dev, dtype=dt) * s
        self.gate_up = torch.randn(H, 2 * MLP, device=dev, dtype=dt) * s
        self.down = torch.randn(MLP, H, device=dev, dtype=dt) * s
        self.n1 = torch.ones(H, device=dev, dtype=dt)
        self.n2 = torch.ones(H, device=dev, dtype=dt)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        b, t, _ = x.shape
        h = F.rms_norm(x, (H,), self.n1)
        qkv = h @ self.qkv
        q, k, v = qkv.split([NH * D, KVH * D, KVH * D], dim=-1)
        q = (q * 1.0001).view(b, t, NH, D).transpose(1, 2)  # stands in for rotary (same traffic)
        k = (k * 1.0001).view(b, t, KVH, D).transpose(1, 2)
        v = v.view(b, t, KVH, D).transpose(1, 2)
        if k_cache is not None:  # attend over the cache in place (paged attention reads it, never copies)
            k, v = k_cache, v_cache
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(b, t, NH * D) @ self.o
        h = F.rms_norm(x, (H,), self.n2)
        g, u = (h @ self.gate_up).chunk(2, dim=-1)
        return x + (F.silu(g) * u) @ self.down


layers = [Layer() for _ in range(LAYERS)]
lm_head = torch.randn(H, VOCAB, device=dev, dtype=dt) * 0.02


def model(x: torch.Tensor, caches: list | None, causal: bool) -> torch.Tensor:
    for i, layer in enumerate(layers):
        kc, vc = caches[i] if caches else (None, None)
        x = layer.forward(x, kc, vc, causal)
    return x[:, -1, :] @ lm_head


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prefill_ms": {}, "decode_ms": {}}
with torch.inference_mode():
    for t in (128, 256, 512, 1024, 2048, 4096, 8192):
        x = torch.randn(1, t, H, device=dev, dtype=dt)
        out["prefill_ms"][t] = timed(lambda x=x: model(x, None, True), reps=5)
        print("prefill", t, out["prefill_ms"][t], file=sys.stderr, flush=True)
    for ctx in (512, 2048):
        for b in (1, 8, 16, 32, 64, 128):
            if b * ctx > 128 * 2048:
                continue
            x = torch.randn(b, 1, H, device=dev, dtype=dt)
            caches = [(torch.randn(b, KVH, ctx, D, device=dev, dtype=dt),
                       torch.randn(b, KVH, ctx, D, device=dev, dtype=dt)) for _ in range(LAYERS)]
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    model(x, caches, False)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                model(x, caches, False)
            out["decode_ms"][f"{b}x{ctx}"] = timed(g.replay, reps=20)
            print("decode", b, ctx, out["decode_ms"][f"{b}x{ctx}"], file=sys.stderr, flush=True)
            del caches, g
            torch.cuda.empty_cache()
print(json.dumps(out, indent=1))
