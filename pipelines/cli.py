"""``giblet-preprocess``: init, run, status, verify, stats, report, gc.

Exit codes: 0 success, 1 failure (one line naming the file/subject/stage, the value and
the fix; the traceback only with ``--debug``), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from giblet.errors import GibletError, StoreError
from pipelines.errors import one_line_errors

PROG = "giblet-preprocess"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build and check giblet study stores.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a config for a BIDS dataset (stdout) and summarize it (stderr)")
    init.add_argument("root", metavar="BIDS_ROOT", help="the raw BIDS dataset")
    init.add_argument("--derivatives", metavar="DIR", help="its fMRIPrep output (BOLD, masks and confounds from there)")
    init.add_argument("--task", action="append", metavar="T", help="read only this task (repeat for several)")
    init.add_argument("--space", metavar="S", help="the derivatives' space (needed when they hold several)")
    init.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    run = sub.add_parser("run", help="build or update the store of CONFIG")
    run.add_argument("config", nargs="?", help="YAML config (omit with --demo)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. fmri.detrend=true")
    run.add_argument("--demo", action="store_true", help="generate a small synthetic study and build it")
    run.add_argument("--out", default="giblet-demo", help="folder for --demo (default: ./giblet-demo)")
    run.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    run.add_argument("--force", action="store_true", help="recompute even if up to date")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask scheduler, e.g. tcp://127.0.0.1:8786 or tls://HOST:8786")
    where.add_argument("--scheduler-file", metavar="FILE",
                       help="the JSON that `dask scheduler --scheduler-file` writes")
    run.add_argument("--tls-ca-file", metavar="PEM", help="tls:// scheduler: the CA certificate")
    run.add_argument("--tls-cert", metavar="PEM", help="tls:// scheduler: this client's certificate")
    run.add_argument("--tls-key", metavar="PEM", help="tls:// scheduler: this client's key (if not in --tls-cert)")
    run.add_argument("--workers", type=int, metavar="N",
                     help="LocalCluster worker processes; 0: run in-process (default: in-process for a small "
                          "build, else min(4, cores); see docs/cli.md)")
    run.add_argument("--in-process", action="store_true", help="run in this process (the same as --workers 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    run.add_argument("--report", metavar="FILE", help="also write what ran, per-stage times and totals as JSON")
    run.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(usage_error=run.error)  # `run` without CONFIG or --demo: exit 2 like any usage error
    for name, text in (("status", "done / stale (why) / missing for each unit"),):
        s = sub.add_parser(name, help=text)
        s.add_argument("config")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        s.add_argument("--only", nargs="+", metavar="STAGE", help="only these stages")
        s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    for name, text in (("verify", "re-check shapes, dtypes, checksums and invariants"),
                       ("stats", "print the data-scale report per modality")):
        s = sub.add_parser(name, help=text)
        s.add_argument("store", help="a store folder or URL (s3://bucket/prefix/study.zarr)")
        s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    rep = sub.add_parser("report", help="write one self-contained HTML page of QC figures and results")
    rep.add_argument("store")
    rep.add_argument("--out", metavar="FILE", help="the HTML file (default: STORE's name + -report.html, beside it)")
    rep.add_argument("--evaluation", action="append", default=[], metavar="DIR",
                     help="a giblet-evaluate output folder of this store (repeat for several; others are searched)")
    rep.add_argument("--carpets", type=int, default=3, metavar="N",
                     help="carpet plots for the N (subject, run)s with the lowest tSNR (default 3; each reads one run)")
    rep.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    rep.set_defaults(usage_error=rep.error)
    gc = sub.add_parser("gc", help="list (and with --yes remove) what killed or losing runs left in a store")
    gc.add_argument("store", help="a store folder or URL")
    gc.add_argument("--yes", action="store_true", help="remove them (default: only list them)")
    gc.add_argument("--min-age", type=_hours, default=24.0, metavar="HOURS",
                    help="only leftovers untouched for this long (default 24; a running build's are younger)")
    gc.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of hours >= 0, e.g. 0 or 24")
    return value


def _demo_config(out: Path) -> Path:
    from giblet.synth import demo_study

    config = out / "demo.yaml"
    if config.exists():  # inputs already generated: reuse them (the rerun is a cache hit)
        return config
    print(f"generating a synthetic study in {out / 'inputs'} ...", file=sys.stderr)
    return demo_study(out / "inputs", config_path=config)  # the one demo, as `python -m giblet.synth --preset demo`


def cmd_run(args) -> int:
    from giblet.config import load_config
    from pipelines.cluster import scheduler_address, tls_security
    from pipelines.engine import run

    if args.demo:
        if args.config:  # `run --demo KEY=VALUE`: the first override lands in `config`
            args.overrides.insert(0, args.config)
        config = _demo_config(Path(args.out))
    else:
        config = Path(args.config)
    if args.in_process:
        if args.workers or args.scheduler or args.scheduler_file:
            args.usage_error("--in-process runs without a cluster: drop --workers N / --scheduler")
        args.workers = 0
    cfg = load_config(config, args.overrides)
    scheduler = scheduler_address(args.scheduler, args.scheduler_file)
    security = tls_security(scheduler, args.tls_ca_file, args.tls_cert, args.tls_key)
    report = run(cfg, only=args.only, force=args.force, scheduler=scheduler, workers=args.workers,
                 progress=not args.no_progress, security=security)
    print(f"{len(report.ran)} unit(s) built, {len(report.skipped)} up to date in {report.seconds:.1f} s",
          file=sys.stderr)
    for line in report.stage_lines():
        print(line, file=sys.stderr)
    if args.report:
        from giblet.store import atomic_write_json

        atomic_write_json(Path(args.report), report.as_dict())
    from giblet.report import default_output

    # not built here: the figures cost seconds, and a rerun that changed nothing should stay ~1 s
    print(f"QC report: `{PROG} report {report.store}` writes {default_output(report.store)}", file=sys.stderr)
    print(report.store)
    return 0


def cmd_init(args) -> int:
    from pipelines.bids_init import init

    return init(args.root, args.derivatives, args.task, args.space)


def cmd_status(args) -> int:
    from giblet.config import load_config
    from pipelines.engine import plan_for
    from pipelines.status import status_lines

    cfg = load_config(args.config, args.overrides)
    _, units = plan_for(cfg, args.only)
    lines, _ = status_lines(cfg, units, args.only)
    print(f"store {cfg.output_path}")
    print("\n".join(lines))
    return 0


def cmd_verify(args) -> int:
    from giblet.verify import store_problem, verify_store

    problem = store_problem(args.store)  # not a store, or never finished: one line, nothing else checked
    if problem:
        raise StoreError(problem)
    problems = verify_store(args.store)
    for p in problems:
        print(p)
    if problems:
        raise GibletError(f"{args.store}: verification failed with {len(problems)} problem(s); first: {problems[0]}")
    print(f"{args.store}: ok")
    return 0


def cmd_gc(args) -> int:
    from giblet.orphans import find_orphans, remove_orphans

    orphans = find_orphans(args.store, args.min_age * 3600)
    for o in orphans:
        print(f"{o.name}  {o.files} file(s), {o.bytes / 2**20:.1f} MiB, untouched {o.age_s / 3600:.1f} h")
    total = f"{len(orphans)} orphan(s), {sum(o.bytes for o in orphans) / 2**20:.1f} MiB"
    if orphans and args.yes:
        remove_orphans(args.store, orphans)
        print(f"{args.store}: removed {total}")
    else:
        print(f"{args.store}: {total}" + (" (dry run: --yes removes them)" if orphans else ""))
    return 0


def cmd_stats(args) -> int:
    from giblet.reader import open_store
    from stats.scale import format_report

    print(format_report(open_store(args.store)))
    return 0


def cmd_report(args) -> int:
    from giblet.report import build_report
    from giblet.verify import store_problem

    problem = store_problem(args.store)  # not a store, or never finished: the one line verify gives
    if problem:
        raise StoreError(problem)
    if args.carpets < 0:
        args.usage_error(f"--carpets {args.carpets}: give 0 or more")
    out = build_report(args.store, args.out, evaluations=args.evaluation, carpets=args.carpets)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may come after options (`run CONFIG --force fmri.detrend=true`).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if args.command == "run" and not args.demo and not args.config:
        args.usage_error("CONFIG is required (or use --demo)")
    commands = {"init": cmd_init, "run": cmd_run, "status": cmd_status, "verify": cmd_verify, "stats": cmd_stats,
                "report": cmd_report, "gc": cmd_gc}
    return one_line_errors(PROG, lambda: commands[args.command](args), debug=args.debug,
                           interrupted="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
