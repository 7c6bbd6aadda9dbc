"""Device experiment (ninth and tenth sessions): Dynamo precompile (torch.compile(...).aot_compile) of the SD 2.1-base
UNet wrapper vs compile_network from a warm Inductor cache, and (tenth session) the Inductor artifact of
`engines.precompiled` (modes artifact / artifact-graphed: compiled and saved when missing, else loaded), each
mode in a fresh process. Needs a CUDA GPU and a
random SD 2.1-base folder at /tmp/sd21-random (python -m dreamfusion_trt.bench.random_model); prints one JSON line."""
import json, os, sys, time
t0 = time.perf_counter()
import torch
from dreamfusion_trt.engines.compile_cache import use_compile_cache
from dreamfusion_trt.sdmodel import load_diffusion
from dreamfusion_trt.engines.wrappers import wrap_network, use_fused_attention
from dreamfusion_trt.engines.spec import make_spec
mode, path = sys.argv[1], sys.argv[2]
from dreamfusion_trt.engines.precompiled import precompiled_network
use_compile_cache("/root/.cache/dreamfusion_trt", "cuda")
t1 = time.perf_counter()
model = load_diffusion("/tmp/sd21-random", device="cuda", dtype="float16")
t2 = time.perf_counter()
spec = make_spec(model, "unet", [2])
mod = wrap_network(model, "unet")
use_fused_attention(mod); mod.to(memory_format=torch.channels_last)
inputs = tuple(spec.sample_inputs(2, "cuda", torch.Generator().manual_seed(0)).values())
res = {"mode": mode, "imports_s": t1 - t0, "model_s": t2 - t1, "torch": torch.__version__}
def timed_call(fn):
    with torch.no_grad():
        out = fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            s = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - s)
    ts.sort(); return out, ts[len(ts)//2] * 1e3
s = time.perf_counter()
if mode == "save":
    gf = getattr(torch.compiler, "keep_portable_guards_unsafe", None) or torch.compiler.skip_all_guards_unsafe
    res["guard_filter"] = gf.__name__
    c = torch.compile(type(mod).forward, fullgraph=True, dynamic=False, options={"guard_filter_fn": gf})
    with torch.no_grad():
        aot = c.aot_compile(((mod, *inputs), {}))
    aot.save_compiled_function(path)
    res["size_mb"] = os.path.getsize(path) / 2**20
    fn = lambda: aot(mod, *inputs)
elif mode == "load":
    with open(path, "rb") as f:
        aot = torch.compiler.load_compiled_function(f)
    res["load_only_s"] = time.perf_counter() - s
    fn = lambda: aot(mod, *inputs)
elif mode in ("artifact", "artifact-graphed"):
    from pathlib import Path
    if path == "auto":  # where generate looks for it
        from dreamfusion_trt.engines.compile_cache import precompiled_folder
        path = str(precompiled_folder("~/.cache/dreamfusion_trt", "cuda", model.key))
    res["had_artifact"] = any(Path(path).glob("unet-b2-*.bin"))
    run = precompiled_network(mod, spec, path, mode="reduce-overhead" if mode == "artifact-graphed" else "default", batch_sizes=(2,))
    fn = lambda: run(*inputs)
elif mode == "compile":
    c = torch.compile(mod, mode="default", dynamic=False)
    fn = lambda: c(*inputs)
else:
    fn = lambda: mod(*inputs)
out, ms = timed_call(fn)
res["ready_s"] = time.perf_counter() - s
res["median_ms"] = ms
with torch.no_grad():
    ref = mod(*inputs).float()
res["max_abs_vs_eager"] = float((out.float() - ref).abs().max()); res["ref_max"] = float(ref.abs().max())
res["total_s"] = time.perf_counter() - t0
print(json.dumps(res))
