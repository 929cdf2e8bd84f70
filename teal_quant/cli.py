"""teal-quant command line: argument parsing and exit codes only; the work is done by library functions.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 an internal error, 130 interrupted (Ctrl-C,
SIGINT), 143 terminated (SIGTERM); after either signal the staged output is removed (docs/safety.md).
Output: summaries and tables on stdout; progress bars and the library's `logging` messages (logger "teal_quant") on
stderr. --verbose shows debug messages, --quiet only warnings and errors, and no progress bars.
Under torchrun (`torchrun --nproc-per-node N -m teal_quant.cli run|bench ...`) only rank 0 shows progress, summaries
and tables; the other ranks show warnings only (prefixed with their rank). An error every rank knows of (checked in
an agreement, teal_quant/distributed.py) is printed once, by rank 0; another rank's own error names the rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _levels(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of numbers like 0,0.25,0.4") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump -> one line, exit 2 (a huge argument is not echoed whole)
        from teal_quant.distributed import env_rank
        from teal_quant.errors import quote

        if env_rank() == 0:  # under torchrun every rank parses the same arguments: rank 0 says what is wrong
            sys.stderr.write(f"teal-quant: error: {quote(' '.join(message.split()), 500)}\n")
        raise SystemExit(2)


def _verbosity_args(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--verbose", "-v", dest="verbosity", action="store_const", const="verbose", default=default,
                       help="also show debug messages")
    group.add_argument("--quiet", "-q", dest="verbosity", action="store_const", const="quiet", default=default,
                       help="only warnings and errors; no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="teal-quant", description="int4/int8 weights + TEAL activation sparsity in one artifact")
    from teal_quant import __version__

    parser.add_argument("--version", action="version", version=f"teal-quant {__version__}")
    _verbosity_args(parser, default="normal")
    common = argparse.ArgumentParser(add_help=False)  # also accepted after the command: `teal-quant run r.yaml -q`
    _verbosity_args(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)

    run = sub.add_parser("run", help="run a recipe: calibrate, quantize, write the artifact")
    run.add_argument("recipe", type=Path)
    run.add_argument("--output", "-o", type=Path, help="artifact directory (overrides output.dir)")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace an existing artifact")
    when = run.add_mutually_exclusive_group()
    when.add_argument("--resume", action="store_true",
                      help="continue an interrupted run of this recipe from its last finished layer")
    when.add_argument("--plan", action="store_true",
                      help="print the predicted disk, host and GPU memory and time per layer (nothing is run); "
                           "exit 2 when this machine cannot hold the run")

    ev = sub.add_parser("eval", help="perplexity (--text) or lm-evaluation-harness tasks (--tasks) of an artifact, "
                                     "with realized sparsity, level by level")
    ev.add_argument("artifact")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", nargs="+", help="text file(s) or globs: perplexity over windows of them")
    what.add_argument("--tasks", type=_names, help="lm-eval tasks, comma separated (wikitext,lambada_openai,...; "
                                                   "needs the [eval] extra)")
    ev.add_argument("--levels", "--sparsity", dest="levels", type=_levels,
                    help="levels to evaluate (default: all of the artifact's with --text, its default with --tasks)")
    ev.add_argument("--prefill", choices=("sparse", "dense", "sparse_last_half"), default="sparse",
                    help="sparse (default): every token thresholded, so the numbers measure TEAL")
    ev.add_argument("--tokens", type=int, default=16384, help="--text: tokens to evaluate")
    ev.add_argument("--window", type=int, default=1024, help="--text: window length")
    ev.add_argument("--baseline", action="store_true", help="--text: also evaluate the float base model named in recipe.yaml")
    ev.add_argument("--limit", type=float, help="--tasks: documents per task (a fraction when < 1)")
    ev.add_argument("--batch-size", default="1", help="--tasks: lm-eval batch size (a number or 'auto')")
    ev.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples")
    ev.add_argument("--include-path", action="append", help="--tasks: a folder of extra lm-eval task YAMLs")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--json", type=Path, help="also write the rows as JSON to this file")

    sub.add_parser("lm-eval", help="lm-evaluation-harness's own command line with the model type `teal` registered "
                                   "(lm-eval run --model teal --model_args pretrained=ARTIFACT,sparsity=0.4 ...)",
                   add_help=False)

    conv = sub.add_parser("convert-gptq", help="import a GPTQ checkpoint: calibrate TEAL thresholds, keep its weights")
    conv.add_argument("source", help="GPTQ checkpoint (local directory or Hub repo id)")
    conv.add_argument("output", type=Path, help="artifact directory")
    conv.add_argument("--levels", type=_levels, default=[0.25, 0.4, 0.5], help="sparsity levels (default 0.25,0.4,0.5)")
    conv.add_argument("--default", type=float, default=0.4, help="default level (one of --levels; default 0.4)")
    conv.add_argument("--calibration", nargs="+", metavar="FILE",
                      help="calibration text files or globs (default: text sampled from the model itself)")
    conv.add_argument("--allocation", choices=("uniform", "greedy"), default="greedy")
    conv.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing artifact")

    ins = sub.add_parser("inspect", help="describe an artifact: format, levels, allocation, bytes")
    ins.add_argument("artifact")
    ins.add_argument("--json", action="store_true", help="print what inspect shows as JSON (nothing else on stdout)")
    ins.add_argument("--plot", type=Path, metavar="DIR",
                     help="write PNG plots into DIR: allocation heatmap, activation histograms, perplexity vs sparsity "
                          "(needs pip install 'teal-quant[plots]')")
    ins.add_argument("--layers", type=_layer_list, default=[0], help="layers whose activation histograms --plot draws (default 0; e.g. 0,5)")

    push = sub.add_parser("push", help="upload an artifact to a Hub model repo (token: HF_TOKEN or `hf auth login`)")
    push.add_argument("artifact", type=Path)
    push.add_argument("repo_id")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--revision", help="branch to push to (created from main when missing)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--delete-extra", action="store_true",
                      help="delete remote files the artifact lacks (default: leave them, e.g. a README edited on the Hub)")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")

    syn = sub.add_parser("synthesize", help="a synthetic artifact of a real architecture: random weights, calibrated thresholds")
    syn.add_argument("arch", help="llama3-8b, llama3-70b, or a config.json path")
    syn.add_argument("output", type=Path)
    _synthetic_args(syn)
    syn.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing artifact")

    bench = sub.add_parser("bench", help="decode speed: ours at a level vs dense int4 vs dense bf16 (tok/s, GB/s, memory)")
    bench.add_argument("target", help="an artifact directory, llama3-8b, llama3-70b, or a config.json (synthetic, in memory)")
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--batch", type=_batches, default=(1,), help="batch size, or several: 1,4,16")
    bench.add_argument("--sparsity", type=float, help="level to measure (default: the artifact's default level)")
    bench.add_argument("--baselines", type=_names, default=None,
                       help="comma list of bf16,int4,tinygemm (or 'none'; default: all three on CUDA, bf16,int4 on the CPU)")
    bench.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--eager", action="store_true", help="no CUDA graphs (default: graphs on CUDA)")
    bench.add_argument("--eager-elementwise", action="store_true",
                       help="keep transformers' eager RMSNorm / SiLU-and-mul / rotary (default on CUDA: one launch each)")
    bench.add_argument("--no-fused-step", action="store_true",
                       help="run transformers' forward each step instead of the fused decode step (CUDA default)")
    bench.add_argument("--warmup", type=int, default=8, help="decode steps before timing")
    bench.add_argument("--profile-steps", type=int, default=4, help="eager decode steps under torch.profiler")
    bench.add_argument("--bf16-extrapolate", action="store_true", default=None,
                       help="measure bf16 at two reduced depths and extrapolate (default: only when it does not fit)")
    bench.add_argument("--extrapolate-layers", type=_two_ints, default=(2, 6), help="the two reduced depths (default 2,6)")
    bench.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks; run as `torchrun --nproc-per-node N -m teal_quant.cli bench ... --tp N`")
    _synthetic_args(bench, arch_only=True)

    gen = sub.add_parser("generate", help="generate text from an artifact, streamed as it decodes; then tok/s and "
                                          "realized sparsity")
    gen.add_argument("artifact", help="an artifact directory or Hub repo id")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--sparsity", type=float, help="one of the artifact's levels (default: its default level)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens (with --temperature)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of probability >= p (with --temperature)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.replace(" ", ",").split(",") if x)
    except ValueError:
        sizes = ()
    if not sizes:
        raise argparse.ArgumentTypeError(f"'{text}' is not a batch size or a list of them like 1,4,16")
    return sizes


def _names(text: str) -> list[str]:
    return [] if text.strip() == "none" else [x for x in text.replace(" ", ",").split(",") if x]


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of layer numbers like 0,5")
    return layers


def _two_ints(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not two layer counts like 2,6") from None
    return a, b


def _synthetic_args(parser: argparse.ArgumentParser, arch_only: bool = False) -> None:
    note = " (synthetic ARCH only)" if arch_only else ""
    parser.add_argument("--bits", type=int, default=4, help="4 or 8" + note)
    parser.add_argument("--group-size", type=int, default=128, help="-1: per-channel" + note)
    parser.add_argument("--levels", type=_levels, default=[0.25, 0.4, 0.5], help="sparsity levels" + note)
    parser.add_argument("--default", type=float, default=0.4, help="default level" + note)
    parser.add_argument("--seed", type=int, default=0)


def _setup_logging(verbosity: str, rank: int = 0) -> None:
    """The library logs to logger "teal_quant"; the CLI shows it on stderr at the level --verbose / --quiet choose
    (ranks other than 0 of a torchrun job: warnings only, prefixed with their rank)."""
    import logging

    logger = logging.getLogger("teal_quant")
    if not any(getattr(h, "_teal_quant_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"teal-quant: {_rank_prefix(rank)}%(message)s"))
        handler._teal_quant_cli = True
        logger.addHandler(handler)
    level = {"verbose": logging.DEBUG, "quiet": logging.WARNING}.get(verbosity, logging.INFO)
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))


def _rank_prefix(rank: int) -> str:
    return f"rank {rank}: " if rank else ""


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's
        from teal_quant.errors import TealQuantError, scrub
        from teal_quant.harness import run_cli

        try:
            return run_cli(argv[1:])
        except TealQuantError as e:
            print(f"teal-quant: error: {_one_line(scrub(str(e)))}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from teal_quant import distributed
    from teal_quant.errors import Interrupted, TealQuantError, Terminated, scrub
    from teal_quant.progress import show_progress

    rank = distributed.env_rank()
    prefix = _rank_prefix(rank)

    def say(line: str, error: BaseException | None = None) -> None:
        if error is None or not distributed.reported_by_main(error):  # an agreed error: rank 0 prints it
            print(line, file=sys.stderr)

    def terminate(signum, frame):
        raise Terminated()

    def interrupt(signum, frame):
        raise Interrupted()

    _setup_logging(args.verbosity, rank)
    previous = signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # not when SIGINT is ignored (a background job) or handled already
        signal.signal(signal.SIGINT, interrupt)
    try:
        with show_progress(args.verbosity != "quiet" and rank == 0):
            if args.command in ("run", "bench") and distributed.env_world_size() > 1:
                distributed.init()  # torchrun: join the job first, so the ranks agree on every error after this
            return _dispatch(args)
    except Terminated as e:
        say(f"teal-quant: {prefix}terminated (SIGTERM); {_kept(e) or 'partial output removed'}")
        return 143
    except TealQuantError as e:  # one line, scrubbed of any token
        say(f"teal-quant: error: {prefix if not distributed.reported_by_main(e) else ''}{_one_line(scrub(str(e)))}", e)
        return 2
    except KeyboardInterrupt as e:
        say(f"teal-quant: {prefix}interrupted; {_kept(e) or 'partial output removed'}")
        return 130
    except distributed.PeerLost as e:  # another rank stopped; its own line says why
        say(f"teal-quant: error: {_one_line(scrub(str(e)))}", e)
        return 1
    except distributed.PeerInternalError as e:  # another rank's internal error, agreed: rank 0 prints it
        say(f"teal-quant: internal error: {_one_line(scrub(str(e)))} (TEAL_QUANT_DEBUG=1 on that rank shows the "
            "traceback)", e)
        return 1
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("TEAL_QUANT_DEBUG") == "1":
            raise
        from teal_quant.errors import first_line

        kept = f"; {_kept(e)}" if _kept(e) else ""
        say(f"teal-quant: internal error: {prefix}{type(e).__name__}: {scrub(first_line(e))} "
            f"(TEAL_QUANT_DEBUG=1 shows the traceback){kept}", e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        distributed.shutdown()


def _kept(error: BaseException) -> str:
    """Where an interrupted run kept its finished layers (pipeline: `resume_note`), or ''."""
    return getattr(error, "resume_note", "") or ""


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or "error"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from teal_quant.compression.recipe import Recipe
        from teal_quant.distributed import agreement, env_rank
        from teal_quant.report import print_plan, print_run_summary
        from teal_quant.workflow import plan, run

        with agreement("reading the recipe"):
            recipe = Recipe.from_yaml(args.recipe)
        if args.plan:
            with agreement("planning the run"):  # the plan of one process; under torchrun rank 0 prints it
                if env_rank() == 0:
                    predicted = plan(recipe, args.output)
                    print_plan(predicted)
                    predicted.check(strict=True)
            return 0
        run(recipe, args.output, overwrite=args.overwrite, report=print_run_summary if env_rank() == 0 else None,
            resume=args.resume)
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "convert-gptq":
        from teal_quant.compression.recipe import convert_gptq_recipe
        from teal_quant.report import print_run_summary
        from teal_quant.workflow import run

        recipe = convert_gptq_recipe(args.source, args.output, levels=args.levels, default=args.default,
                                     calibration=args.calibration, allocation=args.allocation, device=args.device,
                                     overwrite=args.overwrite)
        run(recipe, report=print_run_summary)
        return 0
    if args.command == "inspect":
        from teal_quant.describe import inspect_artifact

        inspect_artifact(args.artifact, as_json=args.json, plot_dir=args.plot, plot_layers=args.layers)
        return 0
    if args.command == "push":
        from teal_quant.artifact.hub import push

        result = push(args.artifact, args.repo_id, private=not args.public, revision=args.revision, message=args.message,
                      endpoint=args.endpoint, delete_extra=args.delete_extra)
        print(result if result.changed else f"{result} (unchanged: no new commit)")
        return 0
    if args.command == "synthesize":
        from teal_quant.compression.synthetic import write_synthetic

        path = write_synthetic(args.arch, args.output, _synthetic_spec(args), device=args.device, overwrite=args.overwrite)
        print(path)
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "generate":
        from teal_quant.textgen import generate_text

        stats = generate_text(args.artifact, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                              sparsity=args.sparsity, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, device=args.device, out=sys.stdout)
        print(stats.summary())
        return 0
    raise AssertionError(args.command)


def _synthetic_spec(args: argparse.Namespace):
    from teal_quant.compression.synthetic import SyntheticSpec

    return SyntheticSpec(bits=args.bits, group_size=args.group_size, levels=tuple(args.levels), default=args.default,
                         seed=args.seed)


def _bench(args: argparse.Namespace) -> int:
    import json

    from teal_quant.bench import BenchOptions, print_bench, run_bench
    from teal_quant.progress import err_console

    options = BenchOptions(
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch if len(args.batch) > 1 else args.batch[0], sparsity=args.sparsity,
        baselines=None if args.baselines is None else tuple(args.baselines), device=args.device,
        cuda_graph=False if args.eager else None, warmup=args.warmup,
        fuse_elementwise=not args.eager_elementwise, fused_step=not args.no_fused_step,
        profile_steps=args.profile_steps,
        seed=args.seed, bf16_extrapolate=args.bf16_extrapolate, extrapolate_layers=args.extrapolate_layers,
        synthetic=_synthetic_spec(args), tp=args.tp,
    )
    from teal_quant.distributed import env_rank

    result = run_bench(args.target, options, report=lambda msg: err_console.print(f"[dim]{msg}[/dim]"))
    if env_rank() != 0:  # tensor parallel: rank 0 reports for every rank
        return 0 if all(v["status"] == "ok" for v in result["variants"]) else 1
    print_bench(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(v["status"] == "ok" for v in result["variants"]) else 1


def _eval(args: argparse.Namespace) -> int:
    import json

    from teal_quant.compression.recipe import TextFilesSource
    from teal_quant.devices import select_device
    from teal_quant.errors import TealQuantError, quote
    from teal_quant.evaluate import evaluate_artifact
    from teal_quant.report import print_eval_table
    from teal_quant.runtime.loading import resolve_artifact

    if args.tasks is not None:
        return _eval_tasks(args)
    for option in ("limit", "num_fewshot", "include_path"):
        if getattr(args, option) is not None:
            raise TealQuantError(f"--{option.replace('_', '-')} is an option of --tasks (lm-eval), not of --text")
    if args.tokens < 16 or args.window < 8:
        raise TealQuantError("--tokens must be >= 16 and --window >= 8")
    if args.levels is not None and not args.levels:
        raise TealQuantError("--levels: no level given (e.g. --levels 0,0.4; leave it out for all of the artifact's)")
    select_device(args.device, option="--device")  # checked before any work
    if args.json is not None and not args.json.parent.is_dir():  # found now, not after the whole evaluation
        raise TealQuantError(f"--json: folder '{quote(args.json.parent)}' does not exist")
    artifact = resolve_artifact(args.artifact)
    levels = args.levels
    if levels is not None:
        for lv in levels:
            try:
                artifact.quant.level_index(lv)
            except ValueError as e:
                raise TealQuantError(f"--levels: {e}") from None
    rows = evaluate_artifact(artifact.path, TextFilesSource(kind="text_files", paths=args.text), tokens=args.tokens,
                             window=args.window, levels=levels, device=args.device, baseline=args.baseline,
                             prefill=args.prefill)
    print_eval_table(f"{artifact.path}: {rows[0]['tokens']} tokens, windows of {args.window}", rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    import json

    from teal_quant.errors import TealQuantError
    from teal_quant.harness import evaluate_tasks
    from teal_quant.report import print_task_table

    if args.baseline:
        raise TealQuantError("--baseline is an option of --text; for lm-eval run the base model with `lm-eval --model hf`")
    if not args.tasks:
        raise TealQuantError("--tasks: name at least one lm-eval task")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    batch_size = args.batch_size if args.batch_size == "auto" else _positive_int(args.batch_size, "--batch-size")
    rows = evaluate_tasks(args.artifact, args.tasks, levels=args.levels, prefill=args.prefill, limit=limit,
                          batch_size=batch_size, device=args.device, include_path=args.include_path,
                          num_fewshot=args.num_fewshot)
    print_task_table(f"{args.artifact}: lm-eval, {args.prefill} prefill", rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _positive_int(text: str, option: str) -> int:
    from teal_quant.errors import TealQuantError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise TealQuantError(f"{option}: expected a positive integer or 'auto', got {text!r}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
