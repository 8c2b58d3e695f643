"""What ``loraserve bench`` is asked to do: its flags and the BenchConfig they make."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any

from loraserve.bench.metrics import SLO_SECONDS
from loraserve.bench.workload import SETTINGS, WorkloadConfig, parse_targets
from loraserve.engine.args import EngineArgs
from loraserve.model.loader import PRESETS

BASELINES = ("base", "peft", "padded", "separate")
HTTP_BASELINES = ("base", "peft")  # the others need an engine option of the server


@dataclass
class PeftOptions:
    batch: int = 32  # requests per generate call (S-LoRA's Table 3: 50 for 7B, 35 for 13B)
    time_limit: float = 120.0  # seconds
    max_adapters: int = 128  # adapters kept in the PEFT model at once (LRU)
    progress: bool = True
    # Only at points with at most this many adapters (S-LoRA's tables have no PEFT figure
    # past n = 100: it loads an adapter per miss); None: at every point.
    max_n: int | None = None


@dataclass
class BenchConfig:
    engine: EngineArgs  # model (a preset or a directory), pool, LoRA limits, ...
    ranks: tuple[int, ...]
    targets: tuple[str, ...]
    num_adapters: tuple[int, ...] = (100,)
    rates: tuple[float, ...] = (10.0,)
    alpha: float = 1.0
    cv: float = 1.0
    duration: float = 300.0
    input_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    seed: int = 42
    setting: str | None = None
    max_requests: int | None = None
    time_limit: float | None = None
    padded_time_limit: float | None = None  # the padded baseline is slow: cut it sooner
    slo_s: float = SLO_SECONDS
    baselines: tuple[str, ...] = ()
    adapter_source: str = "bank"
    separate_adapter_bytes: int | None = None  # None: 10% of the unified pool
    peft: PeftOptions = field(default_factory=PeftOptions)
    url: str | None = None
    api_key: str | None = None
    url_adapters: str = "load"  # load: write + POST /v1/load_lora_adapter; served: as is
    adapter_files: str | None = None  # where --url mode writes adapters (default: a temp dir)
    progress: bool = True
    warmup: bool = True
    host_profile: bool = False  # sample the engine thread's stack in in-process runs
    # after each in-process loraserve run: its average decode step, with and without LoRA
    decode_probe: bool = False
    # (name, engine args): loraserve again with other engine options, on the same trace;
    # results as run "loraserve:NAME" (A/B of engine options in one call).
    variants: tuple[tuple[str, EngineArgs], ...] = ()

    def __post_init__(self) -> None:
        if len(self.num_adapters) > 1 and len(self.rates) > 1:
            raise ValueError("sweep one of -n and --rate at a time (the other takes one value)")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"--ranks must be positive integers, got {self.ranks}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"--max-requests must be >= 1, got {self.max_requests}")
        self._check_baselines()
        for flag, limit in (
            ("--time-limit", self.time_limit),
            ("--padded-time-limit", self.padded_time_limit),
        ):
            if limit is not None and limit <= 0:
                raise ValueError(f"{flag} must be positive, got {limit}")
        self.workloads()  # each validates itself

    def _check_variants(self) -> None:
        names = [name for name, _ in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"--variant names must differ, got {names}")
        if self.variants and self.url:
            raise ValueError("--variant runs engines in this process: not with --url")
        if self.decode_probe and self.url:
            raise ValueError(
                "--decode-probe times the engine in this process: not with --url (drop one)"
            )
        if self.decode_probe and self.host_profile:
            raise ValueError(
                "--decode-probe and --host-profile: the sampler would slow the probe's steps "
                "(drop one)"
            )

    def _check_baselines(self) -> None:
        self._check_variants()
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"--baselines {unknown}: choose from {', '.join(BASELINES)}")
        if self.url and set(self.baselines) - set(HTTP_BASELINES):
            raise ValueError(
                f"with --url only the baselines {', '.join(HTTP_BASELINES)} can run "
                "(padded and separate are options of the server's engine)"
            )

    @property
    def sweep(self) -> str | None:
        """The axis with several values: "n", "rate" or None."""
        if len(self.num_adapters) > 1:
            return "n"
        return "rate" if len(self.rates) > 1 else None

    def workloads(self) -> list[WorkloadConfig]:
        return [
            WorkloadConfig(
                n,
                self.alpha,
                rate,
                self.cv,
                self.duration,
                self.input_range,
                self.output_range,
                self.seed,
            )
            for n in self.num_adapters
            for rate in self.rates
        ]

    def as_dict(self) -> dict[str, Any]:
        """For the results file: everything but the API key."""
        return {**dataclasses.asdict(self), "api_key": None if self.api_key is None else "***"}


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The bench's flags and the engine's (EngineArgs)."""
    w = parser.add_argument_group("workload (S-LoRA's synthetic trace)")
    w.add_argument("--setting", choices=sorted(SETTINGS), help=_settings_help())
    w.add_argument("--ranks", default=None, help="adapter ranks, round-robin (e.g. 64,32,16,8)")
    w.add_argument("--targets", default="qkvo", help="qkvo | all | q_proj,v_proj,...")
    w.add_argument("-n", dest="num_adapters", default="100", help="adapters; 5,100,1000 sweeps")
    w.add_argument("--rate", default="10", help="requests/s; 1,5,10 sweeps (default: 10)")
    w.add_argument("--alpha", type=float, default=1.0, help="adapter popularity power (1: uniform)")
    w.add_argument("--cv", type=float, default=1.0, help="arrival gaps' coefficient of variation")
    w.add_argument("--duration", type=float, default=300.0, help="trace length, s (default 300)")
    w.add_argument("--input-range", default="8,512", help="prompt lengths LO,HI: [LO, HI)")
    w.add_argument("--output-range", default="8,512", help="output lengths LO,HI: [LO, HI)")
    w.add_argument("--seed", type=int, default=42, help="trace seed (default: 42)")
    r = parser.add_argument_group("run")
    r.add_argument("--max-requests", type=int, default=None, help="run only the first N requests")
    r.add_argument("--time-limit", type=float, default=None, help="stop each run after S seconds")
    r.add_argument("--slo", type=float, default=SLO_SECONDS, help="first-token SLO, s (default 6)")
    r.add_argument(
        "--adapter-weights",
        choices=("bank", "random"),
        default="bank",
        help="how generated adapters are made (see loraserve.bench.adapters; default: bank)",
    )
    r.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests")
    r.add_argument(
        "--decode-probe",
        action="store_true",
        help="after each in-process loraserve run, time its average decode batch (rows, "
        "context, distinct adapters of its trace) with and without LoRA on the same engine: "
        "LoRA's extra step time measured at the run's operating point (~10-20 s on a GPU)",
    )
    r.add_argument(
        "--host-profile",
        action="store_true",
        help="sample the engine thread's Python stack every 2 ms in in-process runs and "
        "report the top functions per step kind (where the host time of a step goes)",
    )
    r.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also run loraserve with these engine flags on the same trace, as "
        "'loraserve:NAME' (repeatable), e.g. --variant 'split=--mixed-decode-graphs 64'",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = parser.add_argument_group("baselines (run on the same trace)")
    b.add_argument("--baselines", default="", help=f"comma-separated: {', '.join(BASELINES)}")
    b.add_argument(
        "--padded-time-limit",
        type=float,
        default=None,
        help="time limit of the padded baseline, s (default: --time-limit)",
    )
    b.add_argument(
        "--separate-adapter-bytes",
        type=int,
        default=None,
        help="adapter pool of 'separate' (default: 10%% of the unified pool)",
    )
    b.add_argument("--peft-batch", type=int, default=32, help="PEFT requests per batch")
    b.add_argument("--peft-time-limit", type=float, default=120.0, help="PEFT run limit, s")
    b.add_argument("--peft-max-adapters", type=int, default=128, help="PEFT adapters kept")
    b.add_argument(
        "--peft-max-n",
        type=int,
        default=None,
        help="run the PEFT baseline only at points with n <= N (default: at every point)",
    )
    h = parser.add_argument_group("a running server")
    h.add_argument("--url", default=None, help="drive the server at URL instead of an engine")
    h.add_argument("--api-key", default=None, help="bearer token for --url")
    h.add_argument(
        "--url-adapters",
        choices=("load", "served"),
        default="load",
        help="load: write the trace's adapters and load them via /v1/load_lora_adapter; "
        "served: the server already serves adapter-0000 ...",
    )
    h.add_argument("--adapter-files", default=None, help="where 'load' writes adapters")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    o.add_argument("--plot", default=None, help="PNG path (default: OUT.png for a sweep)")
    o.add_argument(
        "--merge",
        default=None,
        metavar="A.json,B.json",
        help="run nothing: merge the points of earlier results (one per n or rate) into --out",
    )
    EngineArgs.add_cli_args(parser)
    # None: from the ranks (max_lora_rank), see config_from_cli
    parser.set_defaults(max_lora_rank=None)


def _settings_help() -> str:
    rows = [f"{k}: {s.model} ranks {','.join(map(str, s.ranks))}" for k, s in SETTINGS.items()]
    return "S-LoRA's settings (" + "; ".join(rows) + ")"


def config_from_cli(ns: argparse.Namespace) -> BenchConfig:
    setting = SETTINGS.get(ns.setting) if ns.setting else None
    model = ns.model or (setting.model if setting else None)
    if model is None:
        raise ValueError("give --setting (S1, S2, S4, S5, S6) or --model (a preset or a directory)")
    ranks = _ints(ns.ranks, "--ranks") if ns.ranks else (setting.ranks if setting else (16,))
    engine = EngineArgs.from_cli(ns)
    engine = dataclasses.replace(
        engine,
        model=model,
        load_format="dummy" if model in PRESETS else engine.load_format,
        max_lora_rank=engine.max_lora_rank or max(ranks),
    )
    return BenchConfig(
        engine=engine,
        ranks=ranks,
        targets=parse_targets(ns.targets),
        num_adapters=_ints(ns.num_adapters, "-n"),
        rates=tuple(float(r) for r in _split(ns.rate, "--rate")),
        alpha=ns.alpha,
        cv=ns.cv,
        duration=ns.duration,
        input_range=_range(ns.input_range, "--input-range"),
        output_range=_range(ns.output_range, "--output-range"),
        seed=ns.seed,
        setting=ns.setting,
        max_requests=ns.max_requests,
        time_limit=ns.time_limit,
        padded_time_limit=ns.padded_time_limit,
        slo_s=ns.slo,
        baselines=tuple(_split(ns.baselines, "--baselines")) if ns.baselines else (),
        adapter_source=ns.adapter_weights,
        separate_adapter_bytes=ns.separate_adapter_bytes,
        peft=PeftOptions(
            ns.peft_batch,
            ns.peft_time_limit,
            ns.peft_max_adapters,
            not ns.no_progress,
            ns.peft_max_n,
        ),
        url=ns.url,
        api_key=ns.api_key,
        url_adapters=ns.url_adapters,
        adapter_files=ns.adapter_files,
        progress=not ns.no_progress,
        warmup=not ns.no_warmup,
        host_profile=ns.host_profile,
        decode_probe=ns.decode_probe,
        variants=tuple(_variant(text, engine) for text in ns.variant),
    )


def _variant(text: str, engine: EngineArgs) -> tuple[str, EngineArgs]:
    """NAME=FLAGS: ``engine`` with FLAGS (engine flags only) applied on top."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip() or any(c in name for c in " :,"):
        raise ValueError(
            f"--variant {text!r}: expected NAME=FLAGS, e.g. 'nooverlap=--no-overlap-steps'"
        )
    parser = argparse.ArgumentParser(prog=f"--variant {name}", add_help=False, exit_on_error=False)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(**EngineArgs.cli_defaults(engine))
    try:
        ns, unknown = parser.parse_known_args(shlex.split(flags))
    except argparse.ArgumentError as e:
        raise ValueError(f"--variant {name}: {e}") from e
    if unknown:
        raise ValueError(f"--variant {name}: not engine flags: {' '.join(unknown)}")
    return name.strip(), EngineArgs.from_cli(ns)


def _split(text: str, flag: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{flag}: give at least one value")
    return parts


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _split(text, flag))
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from e


def _range(text: str, flag: str) -> tuple[int, int]:
    values = _ints(text, flag)
    if len(values) != 2:
        raise ValueError(f"{flag} {text!r}: expected LO,HI")
    return values[0], values[1]
