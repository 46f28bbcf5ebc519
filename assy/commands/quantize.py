"""``assy quantize``: write a quantized pool (one precision, or a mixed-precision plan), or
add a quantized variant of one model to its own pool (``--as``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from assy.commands.common import (
    calibration_options,
    compute_options,
    note_unused,
    progress_bars,
    user_errors,
    wait_option,
)
from blockpool.sizes import format_size

__all__ = ["quantize_cmd"]

_PRECISIONS = ["fp32", "bf16", "fp16", "int8", "int4", "nf4", "fp4"]


@click.command("quantize")
@click.argument("pool", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="New pool directory.")
@click.option(
    "--as",
    "name",
    help="Add --model, quantized at --precision, to POOL itself under this name.",
)
@click.option(
    "--precision",
    help=f"One precision for every block: {', '.join(_PRECISIONS)} (int4 = nf4).",
)
@click.option("--auto", is_flag=True, help="Plan mixed precisions (needs a budget).")
@click.option("--target-bits", type=float, help="--auto: average bits per weight of each model.")
@click.option("--pool-budget", help="--auto: total block bytes of the pool (4GB, 512MB, 1.5GiB).")
@click.option("--choices", default="nf4,int8,fp16", show_default=True, help="--auto: precisions.")
@calibration_options
@click.option(
    "--calib-samples",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Calibration windows.",
)
@click.option(
    "--calib-seq-len",
    default=64,
    show_default=True,
    type=click.IntRange(min=2),
    help="Tokens per window.",
)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="[default: OUT/calibration]")
@click.option(
    "--screen",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction of blocks measured.",
)
@click.option(
    "--model", "models", multiple=True, help="Quantize only these models (--as: the one model)."
)
@compute_options
@wait_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def quantize_cmd(
    pool: Path,
    out: Path | None,
    name: str | None,
    precision: str | None,
    auto: bool,
    target_bits: float | None,
    pool_budget: str | None,
    choices: str,
    calib_task: str | None,
    calib_data: Path | None,
    calib_samples: int,
    calib_seq_len: int,
    cache_dir: Path | None,
    screen: float,
    models: tuple[str, ...],
    device: str,
    threads: int | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Write a quantized pool (--out), or add a model's quantized variant to POOL (--as).

    Precisions: int8, nf4/fp4 in bitsandbytes' formats. --precision P quantizes every block; --auto plans per-block precisions from weight
    statistics and activation sensitivity on calibration text, within --target-bits or
    --pool-budget (plan in OUT/plan.json). Each new block records its parent.

    --model M --precision P --as NAME writes M's variant into POOL (under its write lock,
    the manifest switched once at the end), where runs, the assembly planner and assy eval
    --budget find it: quantized blocks run packed, so an int8 variant holds about a
    quarter of its fp32 bytes and a 4-bit one about a seventh.
    """
    from assy.errors import UsageError
    from assy.quantization import CalibrationOptions, quantize
    from blockpool import normalize_precision, parse_size, use_threads

    if auto == (precision is not None) or (not auto and (target_bits or pool_budget)):
        raise UsageError("give --precision P, or --auto with --target-bits B or --pool-budget SIZE")
    if any(not m.strip() for m in models):
        raise UsageError("--model is empty; give a model name of the pool (see assy inspect)")
    if precision is not None:
        normalize_precision(precision)
    if (out is None) == (name is None):
        raise UsageError(
            "give one of --out DIR (a new pool) or --as NAME (a variant added to POOL)"
        )
    if not auto:
        names = ["choices", "calib_task", "calib_data", "calib_samples", "calib_seq_len"]
        note_unused([*names, "cache_dir", "screen"], "they set up the --auto planner")
    if name is not None:
        if auto:
            raise UsageError(
                "--as takes one --precision; write a mixed-precision plan to a new pool with --out"
            )
        if len(models) != 1:
            raise UsageError("--as needs exactly one --model: the model to quantize")
        _add_variant(pool, models[0], precision, name, wait, as_json)
        return
    threads = use_threads(threads)
    calibration = CalibrationOptions(
        task=calib_task,
        data=calib_data,
        samples=calib_samples,
        seq_len=calib_seq_len,
        choices=tuple(c.strip() for c in choices.split(",") if c.strip()),
        screen=screen,
        cache_dir=cache_dir,
        device=device,
    )
    result = quantize(
        pool,
        out,
        precision=precision,
        target_bits=target_bits,
        pool_budget=parse_size(pool_budget) if pool_budget else None,
        calibration=calibration,
        models=list(models) or None,
        progress=progress_bars(),
        wait=wait,
    )
    _report(result | {"device": device, "threads": threads}, out, as_json)


def _add_variant(
    pool: Path, model: str, precision: str, name: str, wait: bool, as_json: bool
) -> None:
    from blockpool import Pool, add_quantized_variant, chain_nbytes, normalize_precision, summarize

    opened = Pool(pool)
    add_quantized_variant(opened, model, precision, name, progress=progress_bars(), wait=wait)
    opened = Pool(pool)
    info = summarize(opened)["models"]
    resident = {m: chain_nbytes(opened, opened.model(m).blocks, _fp32()) for m in (model, name)}
    result = {
        "pool": str(pool),
        "model": model,
        "name": name,
        "precision": normalize_precision(precision),
        "file_bytes": info[name]["bytes"],
        "bits": info[name]["bits"],
        "resident_bytes": resident[name],
        "source_resident_bytes": resident[model],
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{name}: {model} at {result['precision']}, {format_size(result['file_bytes'])} on disk "
        f"({result['bits']:.2f} bits/weight); runs in {format_size(resident[name])} of weights "
        f"(fp32 compute) vs {format_size(resident[model])} for {model} -> {pool}"
    )


def _fp32():
    import torch

    return torch.float32


def _report(result: dict[str, Any], out: Path, as_json: bool) -> None:
    info = result["summary"]
    if as_json:
        click.echo(json.dumps(result))
        return
    if result.get("calibration"):
        click.echo(f"planned on calibration text: {result['calibration']}")
    for name, m in info["models"].items():
        click.echo(
            f"{name}: {format_size(m['bytes'])}, {m['bits']:.2f} bits/weight, "
            f"{','.join(m['precisions'])}"
        )
    click.echo(
        f"{info['blocks']} blocks, {format_size(info['bytes'])}, "
        f"{info['bits']:.2f} bits/weight -> {out}"
    )
