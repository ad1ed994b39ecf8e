"""Training-step benchmark table: `python benchmarks/bench_training_step.py [--quick] [--csv F] [--json F]`.

One forward + backward + AdamW step of a Llama-style model with LoRA (dropout 0.05) on
q_proj/v_proj, and on the CPU also on all seven linear layers per block, DoRA on q_proj/v_proj
and prefix tuning (20 virtual tokens): `peft` vs `peft` patched by peftkern vs peftkern's inject_lora /
inject_prefix, and for LoRA on the CPU the patched model with use_peftkern_attention. CPU: fp32,
hidden 512, 4 layers, batch 4 x seq 256; a vocabulary of 2048, and in a fifth case of 32,000
with the patched model also run with use_peftkern_loss (the fused linear + cross-entropy).
GPU (when present): bf16, hidden 4096, 8 layers, seq 2048, vocabulary 32,000, also with
use_peftkern_loss. "x floor" is the ratio to `peft` in the same run (below 1 is faster).
"""

from __future__ import annotations

import torch

from peftkern.benchmarking import training_step
from peftkern.benchmarking.harness import benchmark_arguments, format_table, write_results


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], rounds=10, compile_flag=False)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = training_step.quick_cases() if args.quick else training_step.default_cases()
    results = [r for case in cases for r in training_step.run(case, rounds=args.rounds)]
    print(format_table(results))
    for r in results:
        print(f"{r.case} {r.provider}: {1 / r.ratio_to_floor:.3f}x the speed of peft")
    write_results(results, args.csv, args.json)


if __name__ == "__main__":
    main()
