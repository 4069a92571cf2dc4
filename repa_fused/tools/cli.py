"""The ``repa-fused`` command: ``check`` | ``bench`` | ``cache-features``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Optional, Sequence


def _device_arg(value: Optional[str]):
    import torch

    device = torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("repa-fused: --device cuda was asked for but no CUDA GPU is available")
    return device


def cmd_check(args) -> int:
    from . import check

    device = _device_arg(args.device)
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else (lambda m: None)
    try:
        results = check.run_checks(device, args.backends, log=log)
    except ValueError as error:
        print(f"repa-fused check: {error}", file=sys.stderr)
        return 2
    print(check.format_results(results, device))
    return 0 if all(r.passed for r in results) else 1


def cmd_bench(args) -> int:
    from ..ops import dispatch
    from . import bench

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("repa-fused bench: --plot needs matplotlib, which is not installed: "
                         "pip install 'repa_fused[plot]' (or pip install matplotlib)")
    device = _device_arg(args.device)
    fused = [name for name in dispatch.available_backends(device) if name != "reference"]
    missing = [name for name in (args.backends or []) if name not in fused]
    if missing:
        raise SystemExit(f"repa-fused bench: backend(s) {missing} are not fused backends available on {device}; "
                         f"choose from {fused}")
    report = bench.run(device, cases=args.cases, reps=args.reps, backends=args.backends,
                            with_compile=not args.no_compile, full_size=args.full_size,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(bench.format_table(report, markdown=args.markdown))
    if args.json:
        bench.write_json(report, args.json)
    if args.csv:
        bench.write_csv(report, args.csv)
    if args.plot:
        bench.plot(report, args.plot)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .cases import BENCH_CASES_BY_NAME

    parser = argparse.ArgumentParser(prog="repa-fused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate every available backend against the reference")
    check.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    check.add_argument("--backends", nargs="+", help="only these backends")
    check.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="eager, torch.compile and fused backends side by side")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--cases", nargs="+", metavar="CASE", choices=list(BENCH_CASES_BY_NAME),
                       help="cases to run (default: all): " + "; ".join(
                           f"{case.name}: {case.description}" for case in BENCH_CASES_BY_NAME.values()))
    bench.add_argument("--backends", nargs="+", help="only these fused backends")
    bench.add_argument("--reps", type=_positive_int, help="timed repetitions per variant (default 50 GPU, 5 CPU)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    bench.add_argument("--full-size", action="store_true", help="on a CPU, run the full GPU-sized cases")
    bench.add_argument("--json", help="write the results as JSON to this path")
    bench.add_argument("--csv", help="write the results as CSV to this path")
    bench.add_argument("--plot", help="write a bar chart (PNG) to this path (needs matplotlib)")
    bench.add_argument("--markdown", action="store_true", help="print the table as markdown")
    bench.set_defaults(func=cmd_bench)
    from ..training.cache import add_cache_features_parser
    add_cache_features_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
