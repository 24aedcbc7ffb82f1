"""Forward time of a paper-sized QuestionFusion (hidden 1024, 20 layers) on this machine.

Times one packed forward (B samples, V vision tokens, one ~30-token question, m slots) per
attention implementation, and a follow-up question through the cached prefix (`start` once, then
`ask`) against recomputing the packed forward with both questions. Prints a table and writes JSON.

    python benchmarks/bench_forward.py [--batch 1] [--vision 1450] [--m 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from qfusion import FusionConfig, QuestionFusion
from qfusion.files import write_json


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vision", type=int, default=1450)
    parser.add_argument("--question", type=int, default=30)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="sdpa,eager")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/forward-<device>.json)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # a 7B LLaVA-1.5-shaped host: 4096-wide LLM, 32,000-token vocabulary (the plugin's sizes follow them)
    config = FusionConfig(vision_dim=1280, output_dim=4096, text_vocab_size=32000, m=args.m, n=args.n,
                          attn_impl="sdpa")
    fusion = QuestionFusion(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in fusion.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    vision = torch.randn(args.batch, args.vision, config.vision_dim, generator=gen).to(device, dtype)
    q1 = [torch.randint(0, config.text_vocab_size, (args.question,), generator=gen).to(device)
          for _ in range(args.batch)]
    q2 = [torch.randint(0, config.text_vocab_size, (args.question,), generator=gen).to(device)
          for _ in range(args.batch)]

    rows = []
    with torch.inference_mode():
        for impl in args.impls.split(","):
            fusion.attn_impl = impl
            seconds = timed(lambda: fusion(vision, [[q] for q in q1]), args.repeats)
            rows.append({"case": f"forward, 1 question ({impl})", "seconds": seconds})
        fusion.attn_impl = "sdpa"
        both = timed(lambda: fusion(vision, [[a, b] for a, b in zip(q1, q2)]), args.repeats)
        state = fusion.start(vision)
        _, state = fusion.ask(state, q1)
        follow_up = timed(lambda: fusion.ask(state, q2), args.repeats)
        start_time = timed(lambda: fusion.start(vision), args.repeats)
    rows += [
        {"case": "forward, 2 questions packed (sdpa)", "seconds": both},
        {"case": "start (vision prefix only)", "seconds": start_time},
        {"case": "ask follow-up on cached prefix", "seconds": follow_up},
    ]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype), "params": params,
        "shape": {"batch": args.batch, "vision": args.vision, "question": args.question, "m": args.m, "n": args.n},
        "rows": rows,
    }
    print(f"QuestionFusion {params / 1e6:.1f}M params, {result['device']}, {dtype}, "
          f"B={args.batch} V={args.vision} question={args.question} m={args.m} n={args.n}")
    print(f"{'case':<42} {'seconds':>10}")
    for row in rows:
        print(f"{row['case']:<42} {row['seconds']:>10.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"forward-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    return result


if __name__ == "__main__":
    main()
