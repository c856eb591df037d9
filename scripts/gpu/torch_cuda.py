"""PyTorch fp32 on CUDA, for the student benchmark's ratios on a real GPU.

Runs torch_student.py (the PyTorch counterpart of `deno task bench --only student`, kept outside
this repository) with every tensor it makes on the GPU (torch.set_default_device) and every
time.perf_counter() reading taken after torch.cuda.synchronize(), so its timings hold the GPU
work. TF32 stays off, as on the CPU: plain fp32, like distill's kernels.

  python3 scripts/gpu/torch_cuda.py PERF_DIR [--tokens N] [--qwen3-4b]

PERF_DIR holds torch_student.py and torch_baseline.py. --qwen3-4b swaps the bench config for
Qwen3-4B's sizes (hidden 2560, 36 layers, 32/8 heads x 128, intermediate 9728), the sizes of
scripts/student_scale.ts and scripts/train_scale.ts; the student is then built with the same
ops, and the output says "config": "Qwen3-4B"."""
import sys, time, torch

BENCH_CONFIG = "H, nq, nkv, hd, I, L = 1024, 16, 8, 64, 3072, 8"
QWEN3_4B_CONFIG = "H, nq, nkv, hd, I, L = 2560, 32, 8, 128, 9728, 36"

if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit(__doc__)
perf_dir, flags = sys.argv[1], sys.argv[2:]
assert torch.cuda.is_available(), "no CUDA device: this script times PyTorch on the GPU"
torch.set_default_device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
_perf_counter = time.perf_counter
def _synced_perf_counter():
    torch.cuda.synchronize()
    return _perf_counter()
time.perf_counter = _synced_perf_counter

path = f"{perf_dir}/torch_student.py"
source = open(path).read()
if "--qwen3-4b" in flags:
    assert BENCH_CONFIG in source, f"{path}: the bench config line changed; update this script"
    source = source.replace(BENCH_CONFIG, QWEN3_4B_CONFIG).replace(
        'res = {"tokens": T}', 'res = {"tokens": T, "config": "Qwen3-4B"}')
    flags.remove("--qwen3-4b")
print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)
sys.argv = [path, *flags]
exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})
