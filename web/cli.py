"""`dicom-node user`: accounts of the web pages.

    dicom-node user add NAME --role archivist|clinician|admin [--password-stdin]
    dicom-node user list [--json]
    dicom-node user disable NAME
    dicom-node user enable NAME

The password is asked for twice at a prompt (never taken from the command line, where
`ps` and shell history would keep it), or read from the first line of standard input with
--password-stdin (scripts). Each change is written to the audit trail as done by
`cli:<login name>`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys


def _accounts(args):
    from db.accounts import AccountStore
    from db.engine import make_engine
    from db.migrate import upgrade
    from dicom_node.config import load_settings

    settings = load_settings(args.config)
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    upgrade(engine)
    return AccountStore(engine)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli:unknown"


def _password(args) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        print("dicom-node user: the passwords differ", file=sys.stderr)
        return None
    return first


def cmd_add(args: argparse.Namespace) -> int:
    from db.accounts import AccountError
    from web.passwords import PasswordError, hash_password

    password = _password(args)
    if password is None:
        return 1
    accounts = _accounts(args)
    try:
        user = accounts.add_user(args.name, hash_password(password), args.role)
    except (AccountError, PasswordError) as error:
        print(f"dicom-node user: {error}", file=sys.stderr)
        return 1
    accounts.audit(_actor(), "user_add", f"user:{user.id}", {"role": user.role})
    print(f"added {user.role} {user.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    users = _accounts(args).users()
    if args.json:
        print(json.dumps([{"name": u.name, "role": u.role, "created_at": u.created_at, "disabled": u.disabled}
                          for u in users], indent=2))
        return 0
    if not users:
        print("no users (add one with `dicom-node user add NAME --role admin`)")
    for u in users:
        print(f"{u.name:<24} {u.role:<10} {'disabled' if u.disabled else 'active':<9} {u.created_at}")
    return 0


def _set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    from db.accounts import AccountError

    accounts = _accounts(args)
    try:
        user = accounts.set_disabled(args.name, disabled)
    except AccountError as error:
        print(f"dicom-node user: {error}", file=sys.stderr)
        return 1
    accounts.audit(_actor(), "user_disable" if disabled else "user_enable", f"user:{user.id}")
    print(f"{'disabled' if disabled else 'enabled'} {user.name}")
    return 0


def add_subcommands(subparsers) -> None:
    user = subparsers.add_parser("user", help="accounts of the web pages (add, list, disable)")
    actions = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="add an account (password from a prompt or --password-stdin)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", choices=("archivist", "clinician", "admin"), required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.set_defaults(handler=cmd_add)

    listing = actions.add_parser("list", help="list accounts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    disable = actions.add_parser("disable", help="disable an account (its sessions end at once)")
    disable.add_argument("name", metavar="NAME")
    disable.set_defaults(handler=lambda args: _set_disabled(args, True))

    enable = actions.add_parser("enable", help="enable a disabled account again")
    enable.add_argument("name", metavar="NAME")
    enable.set_defaults(handler=lambda args: _set_disabled(args, False))
