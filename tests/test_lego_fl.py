"""LEGO's federated fine-tuning (``assy federate --method lego``) on a tiny model.

Flower-free: the client round, the server's aggregation and write-back, screening, the
instruction data, all called as plain functions; then ONE small engine run through the
CLI. The real dolly data (``../shared/data/dolly-fed10``) is optional: its test skips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_federation import _one_thread, make_tiny_federation  # noqa: F401 (autouse)

from assy.cli import cli
from assy.errors import UsageError
from assy.federation import lego
from assy.federation.config import FederationConfig
from assy.federation.instructions import DEFAULT_DIR, encode_instructions, instruction_splits
from assy.federation.strategy import Update, screen_updates
from assy.lego import fedavg, heteagg
from assy.lego.lora import PoolModule

SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def _rows(client: int, n: int) -> list[dict]:
    ops = [("add", lambda a, b: a + b), ("sub", lambda a, b: a - b)]
    rows = []
    for k in range(n):
        a, b = (3 * k + client) % 10, (7 * k + 2 * client) % 10
        name, op = ops[(k + client) % 2]
        rows.append({"instruction": f"{name} {a} {b}", "context": "" if k % 3 else f"{a},{b}",
                     "response": f"= {op(a, b)}", "category": name})  # fmt: skip
    return rows


def make_dolly_dir(root: Path, clients: int = 4, n: int = 12) -> Path:
    """FedIT-format toy instruction data: ``local_training_<i>.json``, ``global_test.json``."""
    root.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        (root / f"local_training_{c}.json").write_text(json.dumps(_rows(c, n)))
    (root / "global_test.json").write_text(json.dumps(_rows(9, 8)))
    return root


@pytest.fixture(scope="module")
def lego_fed(tmp_path_factory):
    """A tiny pool with the anchor and its 25/50/75% magnitude variants, and toy data."""
    root = tmp_path_factory.mktemp("lego")
    pool_dir, _ = make_tiny_federation(root)
    from blockpool import Pool

    made = lego.ensure_variants(Pool(pool_dir), "llama", "magnitude", SPARSITIES, print)
    return pool_dir, make_dolly_dir(root / "dolly"), made


def _cfg(lego_fed, tmp_path, **kw) -> FederationConfig:
    pool, data, _ = lego_fed
    settings = dict(pool=str(pool), task="dolly", method="lego", rounds=1, out=str(tmp_path))
    settings |= dict(data=str(data), clients=4, per_round=4, tiers="lego", split="fed10")
    settings |= dict(local_steps=3, batch_size=4, lr=5e-2, max_length=48, prune="magnitude")
    return FederationConfig(**(settings | kw))


@pytest.fixture(scope="module")
def one_round(lego_fed, tmp_path_factory):
    """Every client's first round (Flower-free): ``(cfg, pool, variants, masks, adapters)``."""
    from blockpool import Pool

    torch.set_num_threads(1)
    cfg = _cfg(lego_fed, tmp_path_factory.mktemp("round"))
    pool = Pool(cfg.pool)
    variants = lego.client_variants(cfg, pool, "llama")
    masks = [lego.module_masks(PoolModule(pool, v)) for v in variants]
    states = [lego.lego_round(cfg, p, v, {}, 1)[0] for p, v in enumerate(variants)]
    return cfg, pool, variants, masks, states


def test_variants_are_made_once_and_each_tier_gets_its_sparsity(lego_fed, tmp_path):
    from blockpool import Pool

    pool_dir, _, made = lego_fed
    pool = Pool(pool_dir)
    assert [made[s]["model"] for s in SPARSITIES] == [
        "llama", "llama-magnitude-s25", "llama-magnitude-s50", "llama-magnitude-s75"
    ]  # fmt: skip
    again = lego.ensure_variants(pool, "llama", "magnitude", SPARSITIES, print)
    assert not any(v["made"] for v in again.values())  # reused
    for s in SPARSITIES:
        masks = lego.module_masks(PoolModule(pool, made[s]["model"]))
        zeros = sum(int((~m).sum()) for m in masks.values()) / sum(
            m.numel() for m in masks.values()
        )
        assert abs(zeros - s) < 0.02
    variants = lego.client_variants(_cfg(lego_fed, tmp_path), pool, "llama")
    assert sorted(variants) == sorted(made[s]["model"] for s in SPARSITIES)
    assert lego.tier_sparsities([None, 8, 4, 2, 1], [0, 0.5]) == [0, 0, 0, 0.5, 0.5]


def test_one_round_keeps_every_sparsity_pattern_and_the_global_dense(one_round):
    cfg, pool, variants, masks, states = one_round
    scaling = cfg.lora_alpha / cfg.lora_rank
    for s, m in zip(states, masks, strict=True):  # every upload is non-trivial and masked
        upd = lego.masked_updates(s, m, scaling)
        assert all(bool((u[~m[k]] == 0).all()) for k, u in upd.items())
        assert any(bool(u.abs().sum() > 0) for u in upd.values())
    delta = lego.aggregate_round(states, masks, scaling, "masked")
    for v, m in zip(variants, masks, strict=True):  # write-back: masks before == after
        module = PoolModule(pool, v)
        lego.apply_update(module, lego.variant_values(delta, m), m)
        after = lego.module_masks(module)
        assert all(torch.equal(after[k], m[k]) for k in m)
    union = {k: torch.stack([m[k] for m in masks]).any(0) for k in masks[0]}
    glob = PoolModule(pool, "llama")
    lego.apply_update(glob, delta)
    dense = lego.module_masks(glob)
    for k, u in union.items():
        assert bool(dense[k][u].all())  # dense wherever any client was dense
        assert bool((delta[k][~u] == 0).all())  # untouched where no client held a weight
        assert bool((delta[k][u] != 0).float().mean() > 0.99)


def test_aggregation_is_algorithm_2_on_the_uploaded_adapters(one_round):
    cfg, _, _, masks, states = one_round
    scaling = cfg.lora_alpha / cfg.lora_rank
    delta = lego.aggregate_round(states, masks, scaling, "masked")
    for prefix in (p for p in states[0] if p.endswith("lora_A.weight")):
        name = prefix.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        kb = prefix.replace("lora_A", "lora_B")
        sums = counts = 0
        for s, m in zip(states, masks, strict=True):  # Algorithm 2, spelled out
            p_i = scaling * s[kb].double() @ s[prefix].double() * m[name]
            sums = sums + torch.where(p_i != 0, p_i, 0)
            counts = counts + (p_i != 0).long()
        p_avg = sums / counts.clamp_min(1)
        torch.testing.assert_close(delta[name].double(), p_avg, rtol=1e-5, atol=1e-8)
        for s, m in zip(states, masks, strict=True):  # each client's write-back
            p_i = scaling * s[kb].double() @ s[prefix].double() * m[name]
            back = torch.where(p_i != 0, p_avg, p_i)
            torch.testing.assert_close((delta[name] * m[name]).double(), back, rtol=1e-5, atol=1e-8)


def test_algorithm_2_on_dense_factors_is_fedavg(one_round):
    cfg, _, _, masks, states = one_round
    zero = {k: torch.zeros_like(v) for k, v in states[0].items()}
    factors = heteagg(zero, states, write_back=False)[0]
    averaged = fedavg(states)
    for k in zero:
        torch.testing.assert_close(factors[k], averaged[k], rtol=1e-6, atol=1e-7)
    s = cfg.lora_alpha / cfg.lora_rank
    by_factors = lego.aggregate_round(states, masks, s, "factors")
    by_fedavg = lego.aggregate_round(states, masks, s, "fedavg", [1, 1, 1, 1])
    masked = lego.aggregate_round(states, masks, s, "masked")
    exact = lego.aggregate_round(states, masks, s, "exact")
    for k, d in by_factors.items():
        torch.testing.assert_close(d, by_fedavg[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(masked[k], by_factors[k]) for k in masked)  # not the same
    assert set(exact) == set(masked)


def test_a_nan_adapter_is_rejected_and_the_rest_aggregated(one_round):
    _, _, variants, _, states = one_round
    bad = {k: v.clone() for k, v in states[2].items()}
    next(t for k, t in bad.items() if "lora_B" in k)[0, 0] = float("nan")
    updates = [Update(p, s, 12, 100, variants[p]) for p, s in enumerate(states[:2] + [bad])]
    zero = {k: torch.zeros_like(v) for k, v in states[0].items()}
    kept, rejected = screen_updates(zero, updates)
    assert [u.client for u in kept] == [0, 1]
    assert rejected[0].client == 2 and rejected[0].reason.startswith("non-finite")


def test_instruction_encoding_masks_the_prompt_and_caps_the_length(lego_fed):
    from blockpool import Pool

    _, data, _ = lego_fed
    parts, test = instruction_splits(str(data), "iid", 3, seed=0)
    assert sorted(len(p) for p in parts) == [16, 16, 16] and len(test) == 8
    tok = Pool(lego_fed[0]).tokenizer("llama")
    for ids, n in encode_instructions(tok, parts[0], max_length=40):
        assert len(ids) <= 40 and 0 < n < len(ids)
        assert tok.decode(ids[-n:]).replace(" ", "").startswith("=")
    with pytest.raises(UsageError, match="--clients 4 or fewer"):
        instruction_splits(str(data), "fed10", 5, seed=0)
    with pytest.raises(UsageError, match="use --clients 2"):
        instruction_splits(str(data), "categories", 3, seed=0)


@pytest.mark.skipif(not DEFAULT_DIR.is_dir(), reason="../shared/data/dolly-fed10 not here")
def test_the_fedit_dolly_split_reads_as_ten_clients_and_a_test():
    parts, test = instruction_splits("", "fed10", 10, seed=0, limit=5, test_limit=20)
    assert len(parts) == 10 and all(len(p) == 5 for p in parts) and len(test) == 20
    parts, _ = instruction_splits("", "categories", 8, seed=0, limit=3)
    assert len({r.category for p in parts for r in p}) == 8


def test_federate_lego_runs_on_the_engine_and_keeps_the_masks(lego_fed, tmp_path):
    pool, data, _ = lego_fed
    out = tmp_path / "run"
    args = ["federate", str(pool), "--task", "dolly", "--method", "lego", "--rounds", "1"]
    args += ["--out", str(out), "--data", str(data), "--clients", "4", "--per-round", "4"]
    args += ["--prune", "magnitude", "--local-steps", "2", "--max-length", "48", "--cpus", "2"]
    args += ["--test-limit", "4", "--zero-shot", "arc_easy", "--zero-shot-limit", "3", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    r0, r1 = report["rounds"]
    variants = {"llama", *(f"llama-magnitude-s{s}" for s in (25, 50, 75))}
    for r in (r0, r1):  # zero-shot of the global and every variant, before and after
        assert r["zero_shot"]["arc_easy"]["n"] == 3 and set(r["client_zero_shot"]) == variants
        assert all(0 <= z["arc_easy"]["acc_norm"] <= 1 for z in r["client_zero_shot"].values())
    assert "zero-shot arc_easy acc/acc_norm (n=3): global " in result.stderr
    assert (out / "zero_shot.png").stat().st_size > 0
    # the final global model is a pool assy eval runs, and scores as the last round did
    command = result.stderr.split("the global model, for assy eval: assy ")[1].split()
    assert command[:2] == ["eval", str(out / "final" / "pool")] and "--limit" in command
    evaluated = CliRunner().invoke(cli, [*command, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    scored = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert {k: scored[k] for k in ("acc", "acc_norm", "n")} == {
        k: r1["zero_shot"]["arc_easy"][k] for k in ("acc", "acc_norm", "n")
    }
    assert r1["aggregation"] == "heteagg-masked" and sorted(r1["accepted"]) == [0, 1, 2, 3]
    assert math.isfinite(r1["heldout_loss"]) and r1["heldout_loss"] != r0["heldout_loss"]
    assert set(r1["client_loss"]) == variants
    assert set(r1["variants"]) == {"0", "1", "2", "3"} and set(r1["variants"].values()) == variants
    assert r1["bytes_up"] > 0 and {c["sparsity"] > 0.7 for c in r1["clients"].values()} == {
        True, False
    }  # fmt: skip
    from safetensors.torch import load_file

    from blockpool import Pool

    update = load_file(out / "final" / "global-update.safetensors")
    opened = Pool(pool)
    for v in r1["client_loss"]:  # the final global update written back keeps each pattern
        module = PoolModule(opened, v)
        before = lego.module_masks(module)
        lego.apply_update(module, update, before)
        assert all(torch.equal(a, before[k]) for k, a in lego.module_masks(module).items())


def test_federate_lego_user_errors(lego_fed, tmp_path):
    pool, _, _ = lego_fed
    base = [
        "federate",
        str(pool),
        "--method",
        "lego",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(cli, [*base, "--task", "dolly", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "no instruction data in" in result.output
    result = CliRunner().invoke(cli, [*base, "--task", "arc_easy"])
    assert result.exit_code == 2 and "use it with --task dolly" in result.output
    result = CliRunner().invoke(cli, [*base, "--task", "dolly", "--sparsities", "0,1.5"])
    assert result.exit_code == 2 and "give fractions in [0, 1)" in result.output
    result = CliRunner().invoke(cli, [*base, "--task", "dolly", "--split", "labels"])
    assert (
        result.exit_code == 2 and "--split must be one of fed10, iid, categories" in result.output
    )
    for extra, message in (
        (["--zero-shot", "arc_easy,nope"], "--zero-shot: unknown task 'nope'; use tasks"),
        (["--zero-shot", "arc_easy", "--zero-shot-limit", "0"], "--zero-shot-limit must be at"),
    ):
        result = CliRunner().invoke(cli, [*base, "--task", "dolly", *extra])
        assert result.exit_code == 2 and message in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    fedit = [x if x != "lego" else "fedit" for x in base]
    result = CliRunner().invoke(cli, [*fedit, "--task", "arc_easy", "--zero-shot", "sciq"])
    assert result.exit_code == 2 and "use it with --method lego" in result.output
    assert not (tmp_path / "o").exists()


def test_zero_shot_runs_assy_evals_scoring_on_the_updated_weights(one_round):
    """:func:`lego.zero_shot` scores a variant with G written back through a runner over
    the module's own blocks (not the stored weights), with ``assy eval``'s scoring."""
    from assy.data import load_task
    from assy.evaluation import evaluate_pool_model
    from blockpool import BlockRunner

    cfg, pool, variants, masks, states = one_round
    delta = lego.aggregate_round(states, masks, cfg.lora_alpha / cfg.lora_rank, "masked")
    module = lego.updated_model(pool, "llama-magnitude-s50", {k: 50 * v for k, v in delta.items()})
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    runner = module.inference_runner()
    stored = BlockRunner(pool, "llama-magnitude-s50")
    with torch.no_grad():
        torch.testing.assert_close(runner.forward(ids).logits, module(ids))
        assert not torch.allclose(stored.forward(ids).logits, module(ids), atol=1e-3)
    tok = pool.tokenizer("llama-magnitude-s50")
    examples = {"sciq": load_task("sciq", limit=4)}
    updated = lego.zero_shot(module, tok, examples)["sciq"]
    as_stored = lego.zero_shot(lego.updated_model(pool, "llama-magnitude-s50", None), tok, examples)
    evaluated = evaluate_pool_model(
        pool.root, "llama-magnitude-s50", "sciq", limit=4, progress=False
    )
    keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")
    assert as_stored["sciq"] == {k: evaluated[k] for k in keys}  # = assy eval's numbers
    assert set(updated) == set(keys) and updated["n"] == 4


def test_measure_round_reruns_a_lego_client_round_in_a_fresh_process(one_round):
    """--measure-memory's rerun of a lego client (its variant, round 1): the same round as
    in-process (same losses, same sparsity), with its peak above the fresh floor."""
    from flwr.app import RecordDict

    from assy.federation.memory import measure_round
    from assy.federation.records import CONFIG, config_record

    cfg, _pool, variants, _masks, _states = one_round
    p = len(variants) - 1  # the sparsest variant's client
    config = config_record(cfg, 1)
    config["variant"] = variants[p]
    measured = measure_round(RecordDict({CONFIG: config}), p, cfg.clients)
    _, metrics = lego.lego_round(cfg, p, variants[p], {}, 1)
    assert measured["need_bytes"] > 0 and measured["kind"] == "round"
    same = [k for k in metrics if "seconds" not in k and k != "peak-rss-bytes"]
    assert {"sparsity", "loss_first"} <= set(same), metrics
    for key in same:
        assert measured["metrics"][key] == pytest.approx(metrics[key], rel=1e-6), key
