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
    import torch

    from prfaas.engine.llm import LLM, build_executor
    from prfaas.engine.sampling import InvalidRequest, SamplingParams
    from prfaas.model.config import ModelConfigError
    from prfaas.model.loader import CheckpointError

    if (args.prompt is None) == (args.token_ids is None):
        print("error: give exactly one of --prompt and --token-ids", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        executor, tok = build_executor(args.model, dtype=dtype)
    except (ModelConfigError, CheckpointError, OSError) as e:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # plan / sim / up parse their own flags
    if argv and argv[0] == "plan":
        from prfaas.scheduling.commands import plan_command

        return plan_command(argv[1:])
    if argv and argv[0] == "sim":
        from prfaas.scheduling.commands import sim_command

        return sim_command(argv[1:])
    if argv and argv[0] == "up":
        from prfaas.cluster.local import up_command

        return up_command(argv[1:])
    if argv and argv[0] == "demo":
        from prfaas.cluster.demo import demo_command

        return demo_command(argv[1:])

    p = argparse.ArgumentParser(prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start a local cluster on loopback (see `prfaas up --help`)")
    sub.add_parser("demo", help="send a demo workload to a router (see `prfaas demo --help`)")
    sub.add_parser("plan", help="throughput planner (see `prfaas plan --help`)")
    sub.add_parser("sim", help="cluster simulator (see `prfaas sim --help`)")

    model = sub.add_parser("model", help="model checkpoints").add_subparsers(dest="model_cmd", required=True)
    init = model.add_parser("init", help="write a small random checkpoint in Hugging Face format")
    init.add_argument("--family", choices=["qwen3_next", "kimi_linear"], required=True)
    init.add_argument("--preset", default="tiny")
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(fn=_model_init)

    tr = model.add_parser("train", help="train a small model on the Python standard library (docs/models.md)")
    tr.add_argument("--family", choices=["qwen3_next", "kimi_linear"], required=True)
    tr.add_argument("--out", required=True)
    add_train_args(tr)
    tr.set_defaults(fn=train_command)

    gen = sub.add_parser("generate", help="generate with one in-process executor")
    gen.add_argument("--model", required=True, help="a model directory or builtin:FAMILY-PRESET")
    gen.add_argument("--prompt")
    gen.add_argument("--token-ids", help="comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(fn=_generate)

    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
