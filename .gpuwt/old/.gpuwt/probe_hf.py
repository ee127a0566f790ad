"""Why is eager transformers decode slow on the GPU image? Time generate vs a manual DynamicCache loop; profile."""
import os, sys, tempfile, time, json
sys.path.insert(0, os.getcwd())
import torch
import transformers
from bench.e2e import model_config, build_checkpoint
from transformers import AutoModelForCausalLM, GenerationConfig, DynamicCache

print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
cfg = model_config("llama-3-8b", 4, 4096, {})
with tempfile.TemporaryDirectory() as path:
    build_checkpoint(path, cfg, "cuda")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
print("gen config", model.generation_config, flush=True)
x = torch.randint(3, 1000, (1, 512), device="cuda")
def gen(n, **kw):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw))
    torch.cuda.synchronize(); return time.perf_counter() - t
gen(4)
for kw in ({}, {"cache_implementation": "dynamic"}):
    a, b = gen(1, **kw), gen(33, **kw)
    print("generate", kw, "per token ms", (b - a) / 32 * 1e3, flush=True)
with torch.inference_mode():
    cache = DynamicCache(config=model.config)
    out = model(x, past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(32):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(); print("manual loop per token ms", (time.perf_counter() - t) / 32 * 1e3, flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(x, attention_mask=torch.ones_like(x), generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=5, min_new_tokens=5, eos_token_id=None, pad_token_id=0))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
