"""The ``loraserve`` command.

loraserve generate [--model DIR] [sampling flags] "prompt" ["prompt" ...]
loraserve serve [--model DIR] [--lora-modules NAME=PATH ...] [server and engine flags]
loraserve make-adapters [--model DIR] --out DIR -n 100 --ranks 8,16,32,64 [--targets ...]
loraserve bench --setting S2 -n 5,100,1000 [--baselines base,peft,padded,separate] [--out F]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from loraserve.bench.options import add_bench_args
from loraserve.engine.args import EngineArgs
from loraserve.request import SamplingParams
from loraserve.server.launch import add_serve_args


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=128, help="tokens to generate (default: 128)"
    )
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    group.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)"
    )
    group.add_argument(
        "--top-k", type=int, default=-1, help="sample among the k most likely (-1: off)"
    )
    group.add_argument(
        "--seed", type=int, default=None, help="per-request seed (same seed, same output)"
    )
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=None,
        help="stop token id (repeatable)",
    )
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    group.add_argument(
        "--logprobs", type=int, default=None, help="top-k logprobs per token (with --json)"
    )


def _sampling_params(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.seed,
        stop=ns.stop,
        stop_token_ids=ns.stop_token_id,
        ignore_eos=ns.ignore_eos,
        logprobs=ns.logprobs,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve",
        description="Serve one base LLM with many LoRA adapters.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    gen = sub.add_parser("generate", help="generate completions for prompts and print them")
    gen.add_argument("prompts", nargs="*", help="prompt text (several prompts run as one batch)")
    gen.add_argument(
        "--token-ids",
        action="append",
        default=None,
        help="a prompt as comma-separated token ids (repeatable)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat template",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a PEFT adapter directory (repeatable)",
    )
    gen.add_argument(
        "--use",
        default=None,
        metavar="NAME",
        help="the adapter every prompt uses (default: the base model)",
    )
    _add_sampling_args(gen)
    EngineArgs.add_cli_args(gen)
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_args(serve)
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(func=_serve)

    make = sub.add_parser("make-adapters", help="write random adapters in PEFT's format")
    make.add_argument("--model", default=None, help="HF model directory (default: embedded)")
    make.add_argument("--out", required=True, help="folder to write adapter-0000, ... into")
    make.add_argument("-n", type=int, default=10, help="how many adapters (default: 10)")
    make.add_argument(
        "--ranks", default="8,16,32,64", help="ranks, assigned round-robin (default: 8,16,32,64)"
    )
    make.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projections, or 'all' (default: q,k,v,o)",
    )
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=_make_adapters)

    bench = sub.add_parser(
        "bench",
        help="S-LoRA's benchmark: a synthetic multi-adapter trace, open loop, with baselines",
    )
    add_bench_args(bench)
    bench.set_defaults(func=_bench)
    return parser


def _parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        adapters[name] = path
    return adapters


def _make_adapters(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from loraserve.adapters.peft import make_random_adapter
    from loraserve.config import LORA_TARGETS, ModelConfig
    from loraserve.engine.engine import resolve_model_path

    model_dir = resolve_model_path(ns.model)
    config = ModelConfig.from_dir(model_dir)
    ranks = [int(r) for r in ns.ranks.split(",") if r.strip()]
    targets = list(LORA_TARGETS) if ns.targets == "all" else ns.targets.split(",")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not ranks or ns.n < 1:
        raise ValueError(
            f"--targets {unknown} not in {', '.join(LORA_TARGETS)}"
            if unknown
            else "give -n >= 1 and at least one rank"
        )
    out = Path(ns.out)
    for i in range(ns.n):
        path = out / f"adapter-{i:04d}"
        make_random_adapter(
            path,
            config,
            ranks[i % len(ranks)],
            targets,
            seed=ns.seed + i,
            base_model_name_or_path=str(model_dir),
        )
        sys.stdout.write(f"{path}\n")
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from loraserve.entrypoints.llm import LLM

    prompts: list = list(ns.prompts)
    prompts += [[int(t) for t in ids.split(",") if t.strip()] for ids in ns.token_ids or []]
    if not prompts:
        raise ValueError("give at least one prompt (text, or --token-ids 1,2,3)")
    params = _sampling_params(ns)
    args = EngineArgs.from_cli(ns)
    llm = LLM(adapters=_parse_adapters(ns.adapter), **vars(args))
    if ns.chat:
        if llm.tokenizer is None:
            raise ValueError("--chat needs a model with a tokenizer")
        prompts = [
            llm.tokenizer.apply_chat_template([{"role": "user", "content": p}])
            if isinstance(p, str)
            else p
            for p in prompts
        ]
    outputs = llm.generate(prompts, params, adapter=ns.use)
    for out in outputs:
        if ns.json:
            sys.stdout.write(json.dumps(_as_json(out)) + "\n")
        elif out.error:
            sys.stderr.write(f"error: {out.error}\n")
        else:
            text = out.text if llm.tokenizer else " ".join(map(str, out.token_ids))
            sys.stdout.write(text + "\n")
    return 1 if any(o.error for o in outputs) else 0


def _bench(ns: argparse.Namespace) -> int:
    from loraserve.bench.suite import bench_main

    return bench_main(ns)


def _serve(ns: argparse.Namespace) -> int:
    from loraserve.server.launch import serve

    return serve(ns)


def _as_json(out) -> dict:
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "logprobs": [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
        if out.logprobs
        else None,
        "error": out.error,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except (ValueError, OSError, KeyError) as e:
        sys.stderr.write(f"loraserve: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
