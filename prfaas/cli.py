"""The `prfaas` command."""

from __future__ import annotations

import argparse
import json
import sys

from prfaas.training.cli import add_train_args, train_command


def _model_init(args: argparse.Namespace) -> int:
    from prfaas.model.presets import write_preset

    out = write_preset(args.out, args.family, args.preset, seed=args.seed)
    print(json.dumps({"model_dir": str(out), "family": args.family, "preset": args.preset}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from prfaas.dtypes import torch_dtype
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.errors import InvalidRequest
    from prfaas.messages import SamplingParams

    if (args.prompt is None) == (args.token_ids is None):
        print("error: give exactly one of --prompt and --token-ids", file=sys.stderr)
        return 2
    try:
        executor, tok = build_executor(args.model, dtype=torch_dtype(args.dtype))
    except (InvalidRequest, OSError) as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        ids = tok.encode(args.prompt) if args.prompt is not None else [int(t) for t in args.token_ids.split(",") if t]
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        out = LLM(executor, tok).generate([ids], params)[0]
    except (InvalidRequest, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = tok.decode(out)
    if args.json:
        print(json.dumps({"token_ids": out, "text": text}))
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from prfaas.obs.log import configure
    from prfaas.sim.plots import PlotsUnavailable

    configure("cli", "WARNING", json=False)  # logs on stderr: stdout is for the command's output
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except PlotsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _model_commands(sub: argparse._SubParsersAction) -> None:
    """`prfaas model init` and `prfaas model train`."""
    model = sub.add_parser("model", help="model checkpoints").add_subparsers(dest="model_cmd", required=True)
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    init = model.add_parser("init", help="write a small random checkpoint in Hugging Face format", **fmt)
    init.add_argument("--family", choices=["qwen3_next", "kimi_linear"], required=True, help="the model family")
    init.add_argument("--preset", default="tiny", help="the size preset")
    init.add_argument("--out", required=True, help="the directory to write")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.set_defaults(fn=_model_init)

    tr = model.add_parser("train", help="train a small model on the Python standard library (docs/models.md)", **fmt)
    tr.add_argument("--family", choices=["qwen3_next", "kimi_linear"], required=True, help="the model family")
    tr.add_argument("--out", required=True, help="the directory to write")
    add_train_args(tr)
    tr.set_defaults(fn=train_command)


SUBCOMMANDS = {
    "plan": ("prfaas.scheduling.commands", "plan_command"),
    "sim": ("prfaas.scheduling.commands", "sim_command"),
    "up": ("prfaas.cluster.local", "up_command"),
    "demo": ("prfaas.cluster.demo", "demo_command"),
    "certs": ("prfaas.security.certs_cli", "certs_command"),
    "status": ("prfaas.cluster.status", "status_command"),
    "eval": ("prfaas.eval.cli", "eval_command"),
}


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("--version", "-V"):
        from prfaas import __version__

        print(f"prfaas {__version__}")
        return 0
    # these subcommands parse their own flags
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, function = SUBCOMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]))

    from prfaas import __version__

    p = argparse.ArgumentParser(prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", "-V", action="version", version=f"prfaas {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start a local cluster on loopback (see `prfaas up --help`)")
    sub.add_parser("demo", help="send a demo workload to a router (see `prfaas demo --help`)")
    sub.add_parser("status", help="members of a cluster and their accounting (see `prfaas status --help`)")
    sub.add_parser("certs", help="a cluster CA and per-node certificates (see `prfaas certs --help`)")
    sub.add_parser("plan", help="throughput planner (see `prfaas plan --help`)")
    sub.add_parser("sim", help="cluster simulator (see `prfaas sim --help`)")
    sub.add_parser("eval", help="the three deployments on the real services (see `prfaas eval --help`)")

    _model_commands(sub)
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    gen = sub.add_parser("generate", help="generate with one in-process executor", **fmt)
    gen.add_argument("--model", required=True, help="a model directory or builtin:FAMILY-PRESET")
    gen.add_argument("--prompt", help="the prompt text (or --token-ids)")
    gen.add_argument("--token-ids", help="comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=16, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    gen.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    gen.set_defaults(fn=_generate)

    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
