"""``jaxtune serve``: the fine-tuning service (:mod:`jaxtune.serve`), and ``jaxtune serve keys``
to create, list and revoke its API keys."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI's fine-tuning API on this machine (jaxtune serve keys: API keys)")
    p.add_argument("--data-dir", default="serve-data", help="SQLite database, uploads and runs (default serve-data)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a local HF directory jobs may start from (repeatable); packaged chat models are always there")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="recipe defaults for every job (plan, data.max_length, checkpoint.every, ...)")
    p.add_argument("--device-set", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                   help="the environment of one device set, e.g. CUDA_VISIBLE_DEVICES=0,1 (repeatable: one job at a "
                        "time per set; default one set with every device)")
    p.add_argument("--max-upload-mb", type=float, default=512.0)
    p.add_argument("action", nargs="*", metavar="keys create NAME | keys list | keys revoke ID",
                   help="manage API keys instead of serving")
    p.set_defaults(func=cmd_serve)


def device_set(text: str) -> dict[str, str]:
    from jaxtune.cli import UsageError

    env = {}
    # A value may hold commas (CUDA_VISIBLE_DEVICES=0,1): a new variable starts at NAME=.
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if eq and name.strip().isidentifier():
            env[name.strip()] = value
        elif env:
            last = list(env)[-1]
            env[last] += "," + part
        else:
            raise UsageError(f"--device-set {text!r}: expected VAR=VALUE, e.g. CUDA_VISIBLE_DEVICES=0,1")
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    from jaxtune.cli import UsageError
    from jaxtune.serve.store import Store

    data_dir = Path(args.data_dir).resolve()  # jobs store paths under it: a restart may run elsewhere
    if args.action:
        store = Store(data_dir / "serve.sqlite")
        match args.action:
            case ["keys", "create", name]:
                key_id, secret = store.create_key(name)
                print(f"{secret}\n(key {key_id} for {name}: shown once; send it as Authorization: Bearer <key>)")
            case ["keys", "list"]:
                for key in store.keys():
                    print(json.dumps(key))
            case ["keys", "revoke", key_id]:
                if not store.revoke_key(key_id):
                    raise UsageError(f"no key {key_id!r} in {data_dir} (jaxtune serve keys list shows them)")
                print(f"revoked {key_id}")
            case _:
                raise UsageError(f"unknown action {' '.join(args.action)!r}; use: keys create NAME | keys list | "
                                 "keys revoke ID")
        store.close()
        return 0
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("jaxtune serve needs the serve extra: pip install 'jaxtune[serve]'") from None
    from jaxtune import serve
    from jaxtune.config import read_recipe
    from jaxtune.serve.app import Settings
    from jaxtune.serve.jobs import RequestError, base_models, check_operator_recipe
    from jaxtune.serve.runner import DataDirBusy, lock_data_dir

    local = {}
    for item in args.model:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--model {item!r}: expected NAME=DIR")
        local[name] = path
    recipe = read_recipe(args.recipe) if args.recipe else {}
    try:
        check_operator_recipe(recipe, args.recipe or "")
        models = base_models(local)
    except RequestError as err:
        raise UsageError(str(err)) from None
    settings = Settings(data_dir=data_dir, models=models, recipe=recipe,
                        device_sets=[device_set(d) for d in args.device_set] or [{}],
                        max_upload_bytes=int(args.max_upload_mb * 2**20))
    try:  # fail fast, in one line; the server's job queue holds the lock for its lifetime
        lock_data_dir(data_dir).close()
    except DataDirBusy as err:
        raise UsageError(str(err)) from None
    if not Store(data_dir / "serve.sqlite").keys():
        print(f"no API keys yet: create one with jaxtune serve keys create NAME --data-dir {data_dir}")
    print(f"jaxtune serve: http://{args.host}:{args.port}/v1 (data in {data_dir}; Ctrl-C stops, jobs resume on the "
          "next start)", flush=True)
    serve.run(settings, host=args.host, port=args.port)
    return 0
