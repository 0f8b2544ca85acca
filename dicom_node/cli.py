"""`dicom-node` command line: serve, import, db upgrade, status, and the synthetic-data tools."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from linkage.cli import add_subcommands as add_linkage_subcommands
from linkage.cli_privacy import add_subcommands as add_privacy_subcommands
from linkage.cli_records import add_subcommands as add_records_subcommands
from models.cli import add_subcommands as add_training_subcommands
from synth.cli import add_subcommands as add_synth_subcommands
from web.cli import add_subcommands as add_user_subcommands


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import configure_logging
    from dicom_node.serve import serve

    settings = _settings(args)
    configure_logging(settings)
    # The file the settings came from (as load_settings picks it), for reloading the allow-list.
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return serve(settings, config_path=path)


def _dicom_files(paths: list[Path]):
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def cmd_import(args: argparse.Namespace) -> int:
    from dicom_node.node import build, configure_logging

    settings = _settings(args)
    configure_logging(settings)
    # A folder of its own under the node's: a `serve` running beside it clears only at its start-up.
    parts = build(settings, partial_dir=f"{settings.partial_dir}/import-{os.getpid()}")
    ingestor = parts.ingestor
    stored = duplicates = failed = 0
    for path in _dicom_files(args.paths):
        if not path.exists():
            print(f"{path}: no such file or directory", file=sys.stderr)
            failed += 1
            continue
        result = ingestor.ingest_file(path, calling_ae=args.ae_title)
        if result.ok:
            duplicates += result.duplicate
            stored += not result.duplicate
        else:
            failed += 1
            print(f"{path}: not stored (0x{result.status:04X}): {result.reason}", file=sys.stderr)
    with contextlib.suppress(OSError):   # empty unless a write was cut short; then the next serve clears it
        parts.files.tmp.rmdir()
    print(f"stored {stored}, already present {duplicates}, failed {failed}")
    return 1 if failed else 0


def cmd_process(args: argparse.Namespace) -> int:
    from dicom_node.node import build, configure_logging, make_linker, make_worker

    settings = _settings(args)
    configure_logging(settings)
    parts = build(settings)
    if args.stable_now:
        from db.store import utcnow

        parts.store.mark_stable(utcnow())
    worker = make_worker(settings, parts.engine, make_linker(settings, parts.engine))
    if parts.engine.dialect.name == "sqlite":
        worker.queue.release_claims()  # embedded store: no other process holds claims
    if args.retry_failed:
        print(f"re-queued {worker.queue.retry_failed()} failed series")
    if args.reembed:
        models = {route: (m.name, m.version) for route, m in worker.pipeline.models.items()}
        counts = worker.queue.requeue_other_models(models)
        print(f"re-queued {sum(counts.values())} series embedded by another model than the current one ("
              + (", ".join(f"{route} {n}" for route, n in counts.items() if n) or "none") + ")")
    stats = worker.run_until_idle()
    per_series = 1000 * stats.seconds / stats.done if stats.done else 0.0
    routes = ", ".join(f"{route} {n}" for route, n in sorted(stats.by_route.items())) or "none"
    print(f"processed {stats.done} series ({routes}); failed {stats.failed}; "
          f"to retry later {stats.retried}; {per_series:.0f} ms per series"
          + (f"; linked {worker.linked} series" if worker.linker else ""))
    return 1 if stats.failed else 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.migrate import current_revision, upgrade

    settings = _settings(args)
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.migrate import current_revision, head_revision
    from db.store import IdentityStore

    settings = _settings(args)
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    revision = current_revision(engine)
    if revision != head_revision():
        print(f"database is at revision {revision or 'none'}, not {head_revision()}: "
              "run `dicom-node db upgrade`", file=sys.stderr)
        return 2
    counts = IdentityStore(engine).counts()
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print(f"patients   {counts['patients']}")
    print(f"studies    {counts['studies']}")
    print("series     " + ", ".join(f"{state} {n}" for state, n in counts["series"].items()))
    print(f"instances  {counts['instances']}")
    print(f"bytes      {counts['bytes']} ({counts['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from dicom_node.conformance import render

    text = render(Settings() if args.defaults else _settings(args))
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML settings file (default: ./node.toml if present, else built-in defaults)")
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the DICOM node (migrates the database first)").set_defaults(
        handler=cmd_serve)

    importer = commands.add_parser("import", help="ingest DICOM files or folders as if sent by C-STORE")
    importer.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    importer.add_argument("--ae-title", default="IMPORT", help="recorded as the calling AE (default IMPORT)")
    importer.set_defaults(handler=cmd_import)

    process = commands.add_parser("process", help="run the imaging pipeline on queued series in the foreground")
    process.add_argument("--until-idle", action="store_true", required=True,
                         help="process until no series is ready, then exit")
    process.add_argument("--stable-now", action="store_true",
                         help="treat every series still receiving as stable at once (batch use, tests)")
    process.add_argument("--retry-failed", action="store_true", help="re-queue failed series first")
    process.add_argument("--reembed", action="store_true",
                         help="re-queue first every processed series whose embedding was made by another model "
                              "than the route's current one (after a model change: train, adapt, an update)")
    process.set_defaults(handler=cmd_process)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="migrate the database to the newest schema").set_defaults(
        handler=cmd_db_upgrade)

    status = commands.add_parser("status", help="counts of patients, studies, series, instances, bytes")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(handler=cmd_status)

    conformance = commands.add_parser("conformance", help="print the DICOM Conformance Statement (Markdown), "
                                      "rendered from the node's presentation contexts, statuses and settings")
    conformance.add_argument("--out", type=Path, default=None, metavar="FILE", help="write it to FILE")
    conformance.add_argument("--defaults", action="store_true",
                             help="for the built-in defaults instead of the config file (docs/conformance.md)")
    conformance.set_defaults(handler=cmd_conformance)

    add_synth_subcommands(commands)
    add_training_subcommands(commands)
    add_linkage_subcommands(commands)      # links, review
    add_records_subcommands(commands)      # priors, export
    add_privacy_subcommands(commands)      # privacy-audit
    add_user_subcommands(commands)         # user add/list/disable (web pages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"dicom-node: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear message, not a traceback, for operators
        logging.getLogger("dicom_node").debug("fatal error", exc_info=True)
        print(f"dicom-node: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
