"""The `peftkern` command: `compare`, `bench` and `info`. A thin argparse front: the work is
in peftkern.compare and peftkern.benchmarking."""

from __future__ import annotations

import argparse
import sys

import torch

from peftkern.errors import UsageError


def _info(args: argparse.Namespace) -> int:
    import peftkern

    info = peftkern.build_info()
    print(
        f"peftkern {info['version']} (built with torch {info['torch_version']}, running torch {torch.__version__})"
    )
    if info["cuda"]:
        print(f"CUDA kernels: compiled with CUDA {info['cuda_version']} for {info['cuda_archs']}")
    else:
        print("CUDA kernels: not compiled (CPU build)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"GPU: cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
                f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"
            )
    else:
        cuda = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch"
        print(f"GPU: none ({cuda})")
    threads = (
        f"{torch.get_num_threads()} threads" if info["cpu_parallel"] else "1 thread (built without OpenMP)"
    )
    print(f"CPU kernels: {info['cpu_isa']} on {threads}")
    return 0


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in _list(text))
    except ValueError:
        raise UsageError(f"--train-sizes takes whole numbers separated by commas, got {text!r}") from None


def _compare(args: argparse.Namespace) -> int:
    from peftkern.compare import methods, report
    from peftkern.compare.run import CompareConfig, run
    from peftkern.compare.study import STUDY, Grid
    from peftkern.compare.train import TrainConfig

    if args.list_methods:
        for m in methods.METHODS.values():
            print(f"{m.name:<11} {m.summary}")
        return 0
    # --study sets the grid, epochs and patience; an option given as well wins.
    preset = STUDY if args.study else None
    defaults = TrainConfig()
    train = TrainConfig(
        epochs=args.epochs or (preset.epochs if preset else defaults.epochs),
        max_steps=args.steps,
        batch_size=args.batch_size,
        patience=args.patience or (preset.patience if preset else defaults.patience),
        seed=args.seed,
        progress=not args.no_progress,
    )
    grid = preset.grid if preset else Grid()
    grid = Grid(
        train_sizes=_sizes(args.train_sizes) if args.train_sizes is not None else grid.train_sizes,
        seeds=args.seeds if args.seeds is not None else grid.seeds,
        lr_mode=args.lr if args.lr is not None else grid.lr_mode,
    )
    comparison = run(
        CompareConfig(
            model=args.model,
            data=args.data,
            methods=_list(args.methods),
            out=args.out,
            max_length=args.max_length,
            device=args.device,
            train=train,
            grid=grid,
            command=" ".join(["peftkern", *args.argv]),
        )
    )
    print(report.format_records(comparison.document))
    print()
    print(report.format_source_table(comparison.document))
    print("wrote " + ", ".join(str(f) for f in comparison.files))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from peftkern.benchmarking import suites
    from peftkern.benchmarking.harness import format_table, write_results
    from peftkern.benchmarking.plot import write_plot

    names = _list(args.ops)
    unknown = [n for n in names if n not in suites.SUITES]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(suites.SUITES)}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    results = suites.run_suites(names, quick=args.quick, rounds=args.rounds, with_compile=not args.no_compile)
    print(format_table(results))
    write_results(results, args.csv, args.json)
    if args.plot and not write_plot(results, args.plot):
        raise UsageError("--plot needs matplotlib (pip install 'peftkern[cli]')")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkern", description="Fused kernels for parameter-efficient fine-tuning."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="build information and what this machine offers").set_defaults(run=_info)

    compare = commands.add_parser(
        "compare",
        help="fine-tune a pretrained model with each method and measure them",
        description="Fine-tunes a pretrained model with full fine-tuning, LoRA, ... and head-only, and "
        "reports trainable share, time per step, memory and accuracy. Default: the packaged "
        "MiniLM on the built-in review-sentiment task, offline.",
    )
    compare.add_argument(
        "--methods",
        default="",
        help="comma-separated (default: every one that fits the task; see --list-methods)",
    )
    compare.add_argument("--list-methods", action="store_true", help="list the methods")
    compare.add_argument(
        "--model", help="a local transformers checkpoint directory (default: the packaged MiniLM)"
    )
    compare.add_argument("--data", help='a JSONL file of {"text","label"} or {"prompt","completion"} records')
    compare.add_argument("--epochs", type=int, help="at most this many epochs (default 3; --study: 5)")
    compare.add_argument("--steps", type=int, help="at most this many training steps per method")
    compare.add_argument("--batch-size", type=int, default=16)
    compare.add_argument("--max-length", type=int, default=40, help="tokens per example (default 40)")
    compare.add_argument(
        "--patience",
        type=int,
        help="epochs without a better validation loss before stopping (default 2)",
    )
    compare.add_argument(
        "--train-sizes",
        help="comma-separated training-set sizes, each a prefix of the largest (default: one size, "
        "the task's training split)",
    )
    compare.add_argument("--seeds", type=int, help="seeds per method and size: mean and std (default 1)")
    compare.add_argument(
        "--lr",
        help="default: each method's own learning rate; sweep: 3 rates around it (x1/3, x1, x3), "
        "chosen on validation loss",
    )
    compare.add_argument(
        "--study",
        action="store_true",
        help="the preset that fills in the source's table: every method, sizes 64,256,768, 3 seeds, "
        "--lr sweep, 5 epochs, patience 2 (about an hour on 2 idle CPU cores)",
    )
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    compare.add_argument(
        "--out", default="peftkern-compare", help="directory for compare.csv/.json and the plots"
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.set_defaults(run=_compare)

    bench = commands.add_parser("bench", help="kernel benchmarks: providers x modes, as ratios to the floor")
    bench.add_argument("--ops", default="", help="comma-separated suites (default: all)")
    bench.add_argument("--rounds", type=int, default=15, help="timed rounds per provider and mode")
    bench.add_argument(
        "--quick", action="store_true", help="tiny shapes: checks the suites run, times mean little"
    )
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    bench.add_argument("--csv", help="write the results as CSV")
    bench.add_argument("--json", help="write the results as JSON")
    bench.add_argument("--plot", help="write a PNG of the ratios to the floor")
    bench.set_defaults(run=_bench)
    return parser


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("epochs", "steps", "batch_size", "max_length", "patience", "seeds"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        _check_positive(args)
        return args.run(args)
    except UsageError as error:
        print(f"peftkern {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
