"""Loading the default model (SmolLM2-135M-Instruct Q4_1 GGUF) in its own format: wall and CPU seconds, and
resident memory above an empty `import layerskip_ext`, against the file size (targets: < 1 s, <= 1.5x); then
the engine's build (the first generate of one token: its interleaved copies of the packed matrices, KV cache and
workspace) and the resident memory after it, with its file-backed part (mapped GGUF pages).

    python benchmarks/bench_load.py [--weights auto|fp32|...] [--repeats 3]
Each repeat runs in a fresh process (so the GGUF parse and the tokenizer are not cached); medians printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, time, resource
import layerskip_ext
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
before = rss_mb()
t0, c0 = time.perf_counter(), time.process_time()
model = layerskip_ext.load(weights=WEIGHTS)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = rss_mb() - before
t0 = time.perf_counter()
layerskip_ext.generate(model, "Hello", max_new_tokens=1)
engine_s = time.perf_counter() - t0
with open("/proc/self/status") as f:
    file_mb = next(int(l.split()[1]) for l in f if l.startswith("RssFile:")) / 1024
print(json.dumps({"wall": wall, "cpu": cpu, "rss": rss, "formats": sorted(model.packed_formats),
                  "engine_s": engine_s, "engine_rss": rss_mb() - before, "file_rss": file_mb}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from layerskip_ext.checkpoint import default_model_path
    size_mb = os.path.getsize(default_model_path()) / 2**20
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD.replace("WEIGHTS", repr(args.weights))],
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    wall = statistics.median(r["wall"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    rss = statistics.median(r["rss"] for r in runs)
    print(f"load(weights={args.weights!r}) of a {size_mb:.0f} MiB file: {wall:.2f} s wall, {cpu:.2f} s CPU, "
          f"+{rss:.0f} MiB resident ({rss / size_mb:.2f}x the file); packed formats {runs[0]['formats']}")
    engine_s = statistics.median(r["engine_s"] for r in runs)
    engine_rss = statistics.median(r["engine_rss"] for r in runs)
    file_rss = statistics.median(r["file_rss"] for r in runs)
    print(f"then the engine's build and a first token: {engine_s:.2f} s wall; +{engine_rss:.0f} MiB resident above "
          f"the import ({engine_rss / size_mb:.2f}x the file; the process's file-backed pages: {file_rss:.0f} MiB)")


if __name__ == "__main__":
    main()
