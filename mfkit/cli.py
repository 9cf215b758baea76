"""The `mfkit` command: `mfkit run` executes the notebook chain, `mfkit results` shows a run's table,
`mfkit bench` (when `mfkit.bench` is present) times things."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import MfkitError

PROFILES_HELP = "smoke (CI, minutes), cpu (a laptop), gpu (Colab T4 and up); default: smoke"


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit run`."""
    parser = subparsers.add_parser(
        "run",
        help="execute the numbered notebooks with papermill and tabulate their recorded numbers",
        description="Execute notebooks/NN_slug.ipynb in order with papermill, injecting PROFILE and ARTIFACTS_DIR; "
        "print each notebook's recorded numbers and write OUTPUT/summary.json. A failed notebook skips the "
        "notebooks that require it; the others still run. Exit code: 0 all ok, 1 some failed/skipped, 2 bad input.",
    )
    parser.add_argument("--profile", default="smoke", metavar="{smoke,cpu,gpu}", help=PROFILES_HELP)
    parser.add_argument(
        "--only", metavar="NN[,NN]", help="run only these notebooks (numbers, comma-separated)"
    )
    parser.add_argument("--from", dest="start", metavar="NN", help="start at this notebook number")
    parser.add_argument("--to", dest="end", metavar="NN", help="stop after this notebook number")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where executed notebooks, artifacts/ and summary.json go; default: runs/<profile>",
    )
    parser.add_argument(
        "--param",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra notebook parameter, value read as a Python literal (else a string); repeatable, "
        "e.g. --param MAX_STEPS=10 MODEL=minilm; ARTIFACTS_DIR=... replaces OUTPUT/artifacts",
    )
    parser.add_argument(
        "--notebooks", metavar="DIR", help="folder of NN_slug.ipynb notebooks; default: notebooks/"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop a notebook whose cell runs longer"
    )
    parser.add_argument(
        "--log-output", action="store_true", help="stream the notebooks' output while they run"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run up to N notebooks side by side, each once the notebooks it needs are done, with the cores "
        "shared out between their kernels (default: 1, one at a time in number order)",
    )
    parser.set_defaults(handler=_cmd_run)


def _add_results(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit results`."""
    parser = subparsers.add_parser(
        "results",
        help="print the table of an earlier run (the latest by default), or compare two runs",
        description="Print the table of a run from its summary.json: by default the most recent run under runs/. "
        "--compare A B sets two runs side by side: each notebook's metrics in A and B, their difference, and the "
        "knobs that differ. A and B are run folders (or their summary.json), or profile names for runs/<profile>.",
    )
    parser.add_argument("--output", metavar="DIR", help="the run's output folder; default: the latest run")
    parser.add_argument(
        "--profile", metavar="{smoke,cpu,gpu}", help="show runs/<profile> instead of the latest run"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="compare two runs (folders or profile names), or `reference [RUN]`: a run (default: the latest) "
        "beside the committed reference of its profile, each difference marked expected or not",
    )
    parser.add_argument(
        "--save-reference",
        metavar="RUN",
        help="copy a clean run's recorded results and the CPU they ran on into reference/<profile>/",
    )
    parser.set_defaults(handler=_cmd_results)


def _add_book(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit book [RUN] --output DIR` (mfkit.book, which needs nbconvert, is imported only when it runs)."""
    parser = subparsers.add_parser(
        "book",
        help="render a run's executed notebooks as a static HTML book",
        description="Render a run's executed notebooks (RUN/notebooks) with nbconvert into a static HTML book: a "
        "contents page in chain order, each page linking its neighbours, Colab and its recorded numbers.",
    )
    parser.add_argument(
        "run", nargs="?", metavar="RUN", help="a run folder or profile name; default: the latest"
    )
    parser.add_argument("--output", metavar="DIR", help="where the book goes; default: RUN/book")
    parser.add_argument(
        "--online",
        action="store_true",
        help="typeset math with MathJax and show Colab badges (from the network)",
    )
    parser.set_defaults(handler=_cmd_book)


def _cmd_book(args: argparse.Namespace) -> int:
    """`mfkit book`: build the book, print where it went."""
    from . import book

    print(f"wrote {book.build_book(args.run, args.output, args.online)}")
    return 0


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit bench` from `mfkit.bench`; leave it out when that module does not exist."""
    module = f"{__package__}.bench"
    try:
        bench = importlib.import_module(module)
    except ImportError as exc:
        if exc.name == module:
            return
        problem = f"cannot start: {exc}."

        def broken(args: argparse.Namespace) -> int:
            raise MfkitError(problem, "install the missing package into this environment (see README).")

        # prefix_chars that no option uses: every argument lands in `rest`, and the handler explains the problem
        stub = subparsers.add_parser(
            "bench", help="(unavailable: a dependency is missing)", prefix_chars="\0"
        )
        stub.add_argument("rest", nargs=argparse.REMAINDER)
        stub.set_defaults(handler=broken)
        return
    parser = subparsers.add_parser("bench", help="benchmark models and steps", description=bench.__doc__)
    bench.add_arguments(parser)
    parser.set_defaults(handler=bench.main)


def _add_notebooks(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit notebooks DIR`."""
    parser = subparsers.add_parser(
        "notebooks",
        help="copy the kit's notebooks into a folder (for a pip-installed kit)",
        description="Copy the numbered notebooks the kit ships into DIR, to open in Jupyter or run with "
        "`cd DIR && mfkit run`. Files already there and different are kept unless --force.",
    )
    parser.add_argument("dir", metavar="DIR", help="the folder to copy them into (created if needed)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite copies that differ (your edits are lost)"
    )
    parser.set_defaults(handler=_cmd_notebooks)


def _add_doctor(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit doctor`."""
    from . import doctor

    parser = subparsers.add_parser(
        "doctor", help="check this environment and say how to fix what is missing", description=doctor.__doc__
    )
    parser.set_defaults(handler=lambda args: doctor.main())


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit predict MODEL_DIR --input FILE --output FILE`."""
    from . import predict

    parser = subparsers.add_parser(
        "predict",
        help="batch prediction of a CSV/JSONL file with a saved classifier",
        description=predict.__doc__,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved classifier folder")
    parser.add_argument("--input", required=True, help="a .csv or .jsonl file with one text per row")
    parser.add_argument(
        "--output",
        required=True,
        help="where to write the rows with their label and, for two classes, p_positive (the positive label's probability)",
    )
    parser.add_argument("--text-column", default="text", help="the column holding the text (default: text)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    parser.add_argument("--threshold", type=float, default=None, help="override the saved decision threshold")
    parser.set_defaults(
        handler=lambda args: (
            print(
                "wrote",
                predict.predict_file(
                    args.model_dir, args.input, args.output, args.text_column, args.batch_size, args.threshold
                ),
            )
            or 0
        )
    )


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit serve MODEL_DIR`."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a saved classifier over HTTP (JSON in/out, batched)",
        description='Serve a saved classifier: GET /health, POST /predict with {"texts": [...]}. Concurrent '
        "requests are batched; oversized requests get a 4xx with a message.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved classifier folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="texts per batched forward pass")
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more texts"
    )
    parser.add_argument("--max-texts", type=int, default=64, help="texts allowed in one request")
    parser.add_argument("--max-chars", type=int, default=20_000, help="characters allowed per text")

    def run(args: argparse.Namespace) -> int:
        from . import serve

        limits = serve.Limits(args.max_texts, args.max_chars, args.max_batch, args.max_wait_ms)
        serve.serve(args.model_dir, args.host, args.port, limits)
        return 0

    parser.set_defaults(handler=run)


def _add_gpu_check(subparsers: argparse._SubParsersAction) -> None:
    """Wire `mfkit gpu-check OUTDIR` (the same as `python -m mfkit.gpucheck OUTDIR`)."""
    from . import gpucheck

    parser = subparsers.add_parser(
        "gpu-check", help="a first GPU run: fit, LoRA, QLoRA, generation, one table"
    )
    gpucheck.build_parser(parser).set_defaults(handler=gpucheck.main)


def _cmd_notebooks(args: argparse.Namespace) -> int:
    """`mfkit notebooks DIR`: copy the notebooks, print what was written."""
    from .notebook_cells import copy_notebooks

    written = copy_notebooks(args.dir, force=args.force)
    print(f"{len(written)} notebook(s) copied into {args.dir}" + ("" if written else " (all already there)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `mfkit` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="mfkit", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", title="commands")
    _add_run(subparsers)
    _add_results(subparsers)
    _add_book(subparsers)
    _add_bench(subparsers)
    _add_notebooks(subparsers)
    _add_doctor(subparsers)
    _add_predict(subparsers)
    _add_serve(subparsers)
    _add_gpu_check(subparsers)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    """`mfkit run`: run the chain, return 0 when every notebook ran cleanly, else 1."""
    from . import runner

    logging.basicConfig(format="%(message)s", level=logging.INFO if args.log_output else logging.WARNING)
    report = runner.run_chain(
        profile=args.profile,
        only=runner.parse_only(args.only),
        start=args.start,
        end=args.end,
        output=args.output,
        params=runner.parse_params(args.param),
        notebooks=args.notebooks,
        timeout=args.timeout,
        log_output=args.log_output,
        jobs=args.jobs,
    )
    return report.exit_code


def _cmd_results(args: argparse.Namespace) -> int:
    """`mfkit results`: print the table of an earlier run."""
    from . import runner
    from .errors import check_choice
    from .profiles import PROFILE_NAMES

    if args.save_reference:
        from .reference import save_reference

        print(f"saved the reference ledger in {save_reference(args.save_reference)}")
        return 0
    if args.compare:
        if args.output or args.profile:
            raise MfkitError(
                "--compare takes the two runs itself.", "drop --output/--profile: --compare A B."
            )
        if args.compare[0] == "reference" and len(args.compare) <= 2:
            from .reference import compare_with_reference

            print(compare_with_reference(*args.compare[1:]))
            return 0
        if len(args.compare) != 2:
            raise MfkitError(
                f"--compare got {len(args.compare)} run(s).",
                "give two runs (--compare A B), or the reference and a run (--compare reference RUN).",
            )
        first, second = (runner.load_summary(runner.find_run(name)) for name in args.compare)
        print(runner.format_comparison(first, second, *args.compare))
        return 0
    if args.output is None and args.profile is None:
        output = runner.latest_run()
    else:
        if args.output is None:
            check_choice("--profile", args.profile, PROFILE_NAMES)
        output = runner.resolve_output(args.profile, args.output)
    print(runner.format_summary(runner.load_summary(output)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mfkit` console script; returns the exit code (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the problem
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except MfkitError as exc:
        print(f"mfkit {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mfkit {args.command}: interrupted.", file=sys.stderr)
        return 130
    except OSError as exc:  # a folder that became unwritable or vanished mid-run: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"mfkit {args.command}: {exc.strerror or exc}{where}.\n  Fix: check that folder and its "
            "permissions, then run the command again.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
