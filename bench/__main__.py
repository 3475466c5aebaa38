"""Command line: python -m bench [--op NAME] [--quick] [--threads N] [--allocator glibc|tcmalloc|both]."""
import argparse
import sys

from bench import allocator
from bench.ops import OPS


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time every fasttx backend that can run here against eager PyTorch and torch.compile.")
    parser.add_argument("--op", action="append", choices=sorted(OPS),
                        help="only this op (repeatable); default: all")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_const", dest="level", const="quick",
                       help="a smaller sweep with fewer repetitions (keeps the key cases)")
    level.add_argument("--smoke", action="store_const", dest="level", const="smoke",
                       help="one tiny case, 3 repetitions: checks the harness, not the kernels")
    parser.add_argument("--threads", type=int, action="append",
                        help="CPU threads (repeatable); default: 1 and all cores")
    parser.add_argument("--allocator", choices=("glibc", "tcmalloc", "both"),
                        help=f"malloc to run under; default: {allocator.default_choice()} here (both when "
                             "tcmalloc is installed), with --quick only this process's")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--reps", type=int, help="fixed number of timing rounds per case")
    parser.add_argument("--provider", action="append",
                        help="only this provider (repeatable), e.g. eager, compile, fasttx-cpu")
    parser.add_argument("--out", help="output folder (default bench/results)")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # a run under another allocator, started by the parent process
        from bench.suite import child_main
        child_main(*args.child)
        return 0
    from bench.suite import RESULTS_DIR, run
    run(ops=args.op, level=args.level or "full", threads=args.threads, allocator_choice=args.allocator,
        device=args.device, out_dir=args.out or RESULTS_DIR, reps=args.reps, providers=args.provider)
    return 0


if __name__ == "__main__":
    sys.exit(main())
