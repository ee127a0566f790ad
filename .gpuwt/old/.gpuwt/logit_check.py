"""32-layer Llama-3-8B shape, random bf16: megacp's first-token logits vs transformers' (why greedy ids diverge)."""
import os, sys, tempfile
sys.path.insert(0, os.getcwd())
import torch
from bench.e2e import HF, Megacp, build_checkpoint, model_config
from megacp.sampling import SamplingParams

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
cfg = model_config("llama-3-8b", layers, 4096, {})
g = torch.Generator().manual_seed(0)
prompts = torch.randint(3, 1000, (4, 512), generator=g).tolist()
with tempfile.TemporaryDirectory() as path:
    build_checkpoint(path, cfg, "cuda")
    hf = HF(path)
    with torch.inference_mode():
        ref = hf.model(torch.tensor(prompts, device="cuda")).logits[:, -1].float()
        hf.model.float()
        exact = hf.model(torch.tensor(prompts, device="cuda")).logits[:, -1].float()
    del hf; torch.cuda.empty_cache()
    eng = Megacp(path, max_batched=4096, num_blocks=512)
    outs = eng.engine.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True), return_prompt_logits=True)
    ours = torch.stack([o.prompt_logits for o in outs]).float().cuda()
    eng.close()
for name, x in (("megacp bf16", ours), ("transformers bf16", ref)):
    err = (x - exact).norm(dim=-1) / exact.norm(dim=-1)
    print(f"{name} vs transformers fp32: rel err per prompt {[round(float(e), 5) for e in err]}, "
          f"argmax equal {(x.argmax(-1) == exact.argmax(-1)).tolist()}")
top2 = exact.topk(2, dim=-1).values
print("fp32 top-2 margin / logit std:", [round(float(m), 4) for m in (top2[:, 0] - top2[:, 1]) / exact.std(dim=-1)])
print("megacp vs transformers bf16 argmax equal:", (ours.argmax(-1) == ref.argmax(-1)).tolist())
