"""``loraserve serve``: build the engine, register adapters, run the app under uvicorn.

With no --model the embedded SmolLM2-135M-Instruct is served with three random demo adapters
(demo-a, demo-b, demo-c), written once under ``<cache>/demo-adapters/`` so that a request
right after start can name an adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from loraserve.adapters.peft import CONFIG_FILE, make_random_adapter
from loraserve.config import LORA_TARGETS, ModelConfig
from loraserve.engine.args import EngineArgs
from loraserve.engine.gc_quiet import quiet_gc
from loraserve.model.embedded import EMBEDDED_MODEL_NAME, cache_dir

logger = logging.getLogger(__name__)

API_KEY_ENV = "LORASERVE_API_KEY"
# name -> (rank, targets): different ranks and targets, so that batches mix shapes.
DEMO_ADAPTERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "demo-a": (8, ("q_proj", "v_proj")),
    "demo-b": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "demo-c": (32, LORA_TARGETS),
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's name in the API (default: the model directory's name)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        type=_lora_module,
        metavar="NAME=PATH",
        help="PEFT adapter directories to serve under NAME",
    )
    group.add_argument(
        "--adapter-dir",
        default=None,
        help="load an unknown adapter NAME from DIR/NAME on first use",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
    )
    group.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="answer 503 + Retry-After while N requests already wait (default: no limit)",
    )
    group.add_argument(
        "--no-demo-adapters",
        action="store_true",
        help="with the embedded model, do not register the demo adapters",
    )


def _lora_module(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PATH")
    return name, path


def serve(ns: argparse.Namespace) -> int:
    """Run the server until interrupted (SIGINT/SIGTERM); returns the exit status."""
    import uvicorn

    from loraserve.server.app import ServerConfig, create_app
    from loraserve.server.async_engine import AsyncEngine

    args = EngineArgs.from_cli(ns)
    engine = args.create_engine()
    for name, path in ns.lora_modules:
        engine.add_adapter(name, path)
    if args.model is None and not ns.no_demo_adapters:
        for name, path in ensure_demo_adapters(engine.config.model).items():
            engine.add_adapter(name, path)
    config = ServerConfig(
        served_model_name=ns.served_model_name or served_model_name(args.model),
        model_path=engine.model_path,
        api_key=ns.api_key or None,
        adapter_dir=Path(ns.adapter_dir) if ns.adapter_dir else None,
    )
    app = create_app(AsyncEngine(engine, ns.max_waiting), config)
    quiet_gc()  # the engine thread's pauses for Python's garbage collector: gc_quiet.py
    adapters = ", ".join(engine.adapter_store.names()) or "none"
    sys.stderr.write(
        f"loraserve: serving {config.served_model_name} (adapters: {adapters}) "
        f"at http://{ns.host}:{ns.port}/v1\n"
    )
    uvicorn.run(
        app,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def served_model_name(model: str | None) -> str:
    """The default API name of the base model: the directory's name, or the embedded one."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    return Path(model).expanduser().resolve().name or model


def ensure_demo_adapters(model: ModelConfig, root: Path | None = None) -> dict[str, Path]:
    """The demo adapters' directories under ``root`` (default ``<cache>/demo-adapters``),
    written on first use. Safe when several servers start at once: each adapter is written
    to a temporary directory and renamed into place."""
    root = root or cache_dir() / "demo-adapters"
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (name, (rank, targets)) in enumerate(DEMO_ADAPTERS.items()):
        path = root / name
        if not (path / CONFIG_FILE).is_file():
            _write_demo_adapter(path, model, rank, targets, seed)
        paths[name] = path
    return paths


def _write_demo_adapter(
    path: Path, model: ModelConfig, rank: int, targets: tuple[str, ...], seed: int
) -> None:
    logger.info("writing demo adapter %s (rank %d, %s)", path, rank, ",".join(targets))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        make_random_adapter(
            tmp, model, rank, targets, seed=seed, base_model_name_or_path=EMBEDDED_MODEL_NAME
        )
        if path.exists() and not (path / CONFIG_FILE).is_file():
            shutil.rmtree(path)  # left over from an interrupted write
        os.replace(tmp, path)
    except OSError:
        if not (path / CONFIG_FILE).is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
