"""``--method assy`` with tiny models, Flower's messages and the real ClientApp handlers, run
in this process by a grid that calls the handlers (the engines are tested for fedit).

Two tiers: one without a limit, one whose budget holds no whole model, so its candidates
are assemblies with seams; the planner scores seams with an ``assy compare`` output of the
pool (``--compat``). A selection round (forward only, within each tier's budget),
then adapter rounds (FedAvg per recipe); the final assemblies load and run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_federation import _char_tokenizer, assert_private, synthetic_examples
from tiny_models import TINY

from assy.federation.config import FederationConfig


@pytest.fixture(autouse=True)
def _server_identity():
    """What a ServerApp process has set before it builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class InProcessGrid:
    """Flower's Grid calls the server makes, answered by the ClientApp's handlers here, as
    the engines answer them: through the ClientApp's SecAgg+ mod, a copy of the content per
    node, a context kept per node between messages, an exception as an error reply."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.sent: list = []
        self.contexts: dict = {}

    def get_node_ids(self):
        return list(range(1, self.clients + 1))

    def pull_messages(self, _ids):
        return []

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, Error, Message, Metadata, RecordDict

        from assy.federation.client_app import hello, train
        from assy.federation.secagg import secagg_mod

        replies = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            meta = Metadata(1, f"m{i}", 0, node, "", msg.metadata.group_id, 0.0, 3600.0, kind)
            config = {"partition-id": node - 1, "num-partitions": self.clients}
            context = self.contexts.setdefault(node, Context(1, node, config, RecordDict(), {}))
            handler = hello if kind == "query" else train
            content = copy.deepcopy(msg.content)  # as sent over the wire: a copy per node
            received = Message(content=content, metadata=meta)
            try:
                reply = secagg_mod(received, context, handler)
            except Exception as e:  # noqa: BLE001 - as the engines answer: an error reply
                reply = Message(error=Error(0, f"Message: {e}"), reply_to=received)
            self.sent.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def two_family_fed(tmp_path_factory):
    from blockpool import build_pool

    root = tmp_path_factory.mktemp("assyfed")
    sources = []
    for family in ("llama", "gemma3"):
        torch.manual_seed(1)
        # wider than the other tests' tiny models: weights, not activations, must dominate
        # a round's memory for a tier to hold a training step but no whole model (adapter
        # rounds keep the tier's budget too)
        tiny = TINY[family]()
        wide = {"hidden_size": 768, "intermediate_size": 1536}
        if family == "gemma3":
            wide |= {"head_dim": 64, "query_pre_attn_scalar": 64}
        model = type(tiny)(type(tiny.config)(**(tiny.config.to_dict() | wide))).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(20.0)
        model.save_pretrained(root / family)
        _char_tokenizer().save_pretrained(root / family)
        sources.append(f"{family}={root / family}")
    build_pool(sources, root / "pool", dtype="fp32")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_examples()))
    return root / "pool", data


def _tiers(pool: Path, path: Path, batch: int = 4) -> Path:
    """An unlimited tier and one below the smallest whole model (assemblies only), for
    clients that train on ``batch`` × 64 tokens."""
    from assy.assembly.planner import pool_candidates
    from blockpool import Pool

    cands = [c for c in pool_candidates(Pool(pool), batch=batch, tokens=64) if c.causal]
    whole = min(c.bytes + c.layer_work + c.logit_work for c in cands)
    tiers = [
        {"name": "big", "share": 0.5, "budget": None},
        {"name": "small", "share": 0.5, "budget": str(whole - 1)},
    ]
    path.write_text(json.dumps(tiers))
    return path


def test_assy_selects_per_tier_then_trains_and_averages_adapters(
    two_family_fed, compared, tmp_path
):
    from assy.assembly import load_assembly
    from assy.federation import task
    from assy.federation.server import run_server
    from blockpool import Pool

    pool, data = two_family_fed
    torch.set_num_threads(1)
    cfg = FederationConfig(
        pool=str(pool), task="arc_easy", method="assy", rounds=3, out=str(tmp_path / "run"),
        data=str(data), clients=4, per_round=4, tiers=str(_tiers(pool, tmp_path / "t.json", 1)),
        local_steps=3, batch_size=1, max_length=64, fit_samples=8, candidates=2, test_limit=24,
        compat=str(compared / "all"),
    )  # fmt: skip
    grid = InProcessGrid(cfg.clients)
    lines: list[str] = []
    state = run_server(grid, cfg, lines.append)
    history = state.history
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert state.facts["assy"]["compatibility"] == cfg.compat  # the server planned with it
    proposals = state.facts["assy"]["proposals"]
    assert set(proposals) == {"big", "small"}
    small = proposals["small"]
    assert small and all(c["seams"] >= 1 for c in small)  # no whole model fits
    budget_small = next(t["budget"] for t in state.facts["tiers"] if t["name"] == "small")
    assert all(c["total_bytes"] <= budget_small for c in small)

    select = history[1]
    assert select["aggregation"] == "votes" and len(select["accepted"]) == 4
    assert set(select["chosen"]) == {"big", "small"}
    assert select["chosen"]["small"] in {c["key"] for c in small}
    # a vote is a few numbers: no adapters go up in a selection round
    assert select["bytes_up"] < 2000, select["bytes_up"]
    # selection ran within each client's budget, through the swapper
    small_clients = [r for r in grid.sent if "score:" + small[0]["key"] in r.content["metrics"]]
    assert small_clients
    for reply in small_clients:
        assert 0 < reply.content["metrics"]["peak-resident-bytes"] <= budget_small
    assert 0 < select["peak_resident_bytes"]["small"] <= budget_small

    adapt = history[2]
    assert adapt["aggregation"] == "fedavg" and not adapt["rejected"], adapt
    assert adapt["global_sha256"] != select["global_sha256"]
    assert history[3]["chosen"] == select["chosen"]
    for r in history:
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_tier"]) == {"big", "small"}

    final = Path(cfg.out) / "final"
    summary = json.loads((final / "recipe.json").read_text())
    assert summary["compatibility"] == cfg.compat
    opened = Pool(pool)
    for tier, entry in summary["tiers"].items():
        assembly = load_assembly(opened, final / entry["assembly"])
        assert entry["assembly"] == select["chosen"][tier]
        assert len(assembly.adapters) == len(assembly.recipe.seams)

    examples = task.federated_data(cfg).clients[0]
    assert_private(grid.sent, examples, opened.tokenizer("llama"))


def test_assy_needs_a_round_after_selection(two_family_fed, tmp_path):
    from assy.errors import UsageError

    pool, data = two_family_fed
    with pytest.raises(UsageError, match="give --rounds more than 1"):
        FederationConfig(
            pool=str(pool), task="arc_easy", method="assy", rounds=1, out=str(tmp_path),
            data=str(data),
        )  # fmt: skip


@pytest.fixture(scope="module")
def compared(two_family_fed, tmp_path_factory):
    """``assy compare`` outputs of the tiny pool, made by the comparator: every model, and
    the Llama alone (an output that does not cover the pool)."""
    from assy.comparator import compare_pool

    pool, _ = two_family_fed
    out = tmp_path_factory.mktemp("compare")
    texts = [f"{r['context']}{r['choices'][r['label']]}" for r in synthetic_examples(16)]
    for name, models in (("all", None), ("llama", ["llama"])):
        compare_pool(pool, out / name, texts, models=models, max_tokens=16, progress=False)
    return out


def test_assy_proposals_follow_compat(two_family_fed, compared, tmp_path):
    """With --compat the planner scores seams by the comparator, not by depth: a chain the
    fallback proposes (gemma3's ends around Llama's layers) is no longer proposed."""
    from assy.assembly.planner import load_compat, plan_assembly, pool_candidates
    from assy.federation.selection import propose
    from blockpool import Pool

    pool, data = two_family_fed
    opened = Pool(pool)
    batch = FederationConfig.batch_size  # the planner sizes a client's batch of max_length
    cands = {c.name: c for c in pool_candidates(opened, batch=batch, tokens=64)}
    whole = {n: c.bytes + c.layer_work + c.logit_work for n, c in cands.items()}
    # room for Llama (2 layers) whole, not for gemma3 (3 layers) whole
    budgets = {"mid": (whole["llama"] + whole["gemma3"]) // 2}
    base = dict(
        pool=str(pool), task="arc_easy", method="assy", rounds=2, out=str(tmp_path / "run"),
        data=str(data), clients=4, per_round=4, max_length=64, candidates=4,
    )  # fmt: skip
    fallback = propose(opened, budgets, FederationConfig(**base))["mid"]
    scored = propose(opened, budgets, FederationConfig(**base, compat=str(compared / "all")))["mid"]

    def recipe(c):
        return c.recipe.anchor, [(s.source, s.layers) for s in c.recipe.slices]

    crossed = ("gemma3", [("llama", (0, 1))])
    assert crossed in [recipe(c) for c in fallback]
    assert crossed not in [recipe(c) for c in scored]
    # the comparator's scores, not the depth fallback's, rank what is proposed
    table = load_compat(compared / "all")
    for c in scored:
        plan = plan_assembly(
            list(cands.values()), budgets["mid"], compat=table, max_seams=c.seams,
            anchors=[c.recipe.anchor],
        )  # fmt: skip
        assert c.score == pytest.approx(plan.objective)
    before = {c.key: c.score for c in fallback}
    assert any(c.seams and c.score != pytest.approx(before[c.key]) for c in scored)


def test_assy_compat_bad_input_is_one_line_before_anything_starts(
    two_family_fed, compared, tmp_path
):
    from click.testing import CliRunner

    from assy.cli import cli

    pool, data = two_family_fed
    out = tmp_path / "run"
    args = ["federate", str(pool), "--task", "arc_easy", "--rounds", "2", "--clients", "4",
            "--per-round", "4", "--data", str(data), "--out", str(out)]  # fmt: skip
    cases = [
        ("assy", tmp_path / "nowhere", "no comparator output"),
        ("assy", data, "not a comparator output"),
        ("assy", compared / "llama", "no comparator scores for the layer blocks of gemma3"),
        ("fedit", compared / "all", "use it with --method assy"),
    ]
    for method, compat, message in cases:
        result = CliRunner().invoke(cli, [*args, "--method", method, "--compat", str(compat)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "--compat" in lines[0], lines
        assert "Traceback" not in result.output and not out.exists()


def test_assy_secagg_adapter_rounds_match_plain_within_quantization(two_family_fed, tmp_path):
    """``--secagg``: the selection round stays plain (votes), the adapter round runs one
    SecAgg+ session per recipe with two or more clients; its global agrees with the plain
    run's within the quantization bound, and no client's adapter went up in the clear."""
    from assy.federation.secagg import quantization_bound
    from assy.federation.server import run_server

    pool, data = two_family_fed
    torch.set_num_threads(1)
    tiers = str(_tiers(pool, tmp_path / "t.json", 1))
    runs = {}
    for secagg in (False, True):
        cfg = FederationConfig(
            pool=str(pool), task="arc_easy", method="assy", rounds=2, data=str(data),
            out=str(tmp_path / f"run-{secagg}"), clients=4, per_round=4, tiers=tiers,
            local_steps=3, batch_size=1, max_length=64, fit_samples=8, candidates=2, test_limit=24,
            secagg=secagg,
        )  # fmt: skip
        grid = InProcessGrid(cfg.clients) if secagg else InProcessGrid(cfg.clients)
        runs[secagg] = (run_server(grid, cfg, lambda _line: None), grid)
    (plain, _), (secure, grid) = runs[False], runs[True]
    assert secure.history[1]["aggregation"] == "votes" and "secagg" not in secure.history[1]
    assert secure.history[1]["chosen"] == plain.history[1]["chosen"]
    adapt = secure.history[2]
    assert adapt["aggregation"] == "secagg-fedavg" and adapt["rejected"] == []
    groups = adapt["secagg"]["groups"]
    assert groups and all(g["aggregate"] == "ok" and g["clients"] >= 2 for g in groups.values())
    assert adapt["accepted"] == plain.history[2]["accepted"]
    trained = [k for k in plain.global_state if k.split("/", 1)[0] in groups]
    assert trained
    for key, g in groups.items():
        bound = quantization_bound(g["clipping_range"], [g["max_weight"]] * g["clients"])
        for name in (k for k in trained if k.startswith(f"{key}/")):
            diff = (secure.global_state[name].double() - plain.global_state[name].double()).abs()
            assert float(diff.max()) <= bound + 1e-6, (name, float(diff.max()), bound)
    for reply in grid.sent:  # no FitRes went up with its parameters
        for name, record in reply.content.items():
            if name.endswith("parameters"):
                assert not any(len(a.data) for a in record.values()), name


def test_measure_memory_reruns_a_client_round_alone_per_tier_and_phase(two_family_fed, tmp_path):
    """--measure-memory: one client per tier and phase runs its round again in a fresh
    process from the very content the server sent; the round is the same round (same
    scores, same first loss) and its need and budget are recorded."""
    from assy.federation.server import run_server

    pool, data = two_family_fed
    torch.set_num_threads(1)
    cfg = FederationConfig(
        pool=str(pool), task="arc_easy", method="assy", rounds=2, out=str(tmp_path / "run"),
        data=str(data), clients=2, per_round=2, tiers=str(_tiers(pool, tmp_path / "t.json")),
        local_steps=2, max_length=64, fit_samples=8, candidates=2, test_limit=8,
        measure_memory=True,
    )  # fmt: skip
    grid = InProcessGrid(cfg.clients)
    lines: list[str] = []
    state = run_server(grid, cfg, lines.append)
    measured = state.facts["client_memory"]
    assert set(measured) == {"select", "adapt"}
    budgets = {t["name"]: t["budget"] for t in state.facts["tiers"]}
    rounds = [r for r in grid.sent if "client-seconds" in r.content["metrics"]]  # no discovery
    by_round = [{r.metadata.src_node_id - 1: r for r in rounds[i : i + 2]} for i in (0, 2)]
    for phase, sent in zip(("select", "adapt"), by_round, strict=True):
        assert set(measured[phase]) == {"big", "small"}, measured
        for tier, m in measured[phase].items():
            assert m["need_bytes"] > 0 and m["peak_rss_bytes"] > m["need_bytes"]
            assert m["budget"] == budgets[tier] and m["phase"] == phase
            reply = sent[m["partition"]].content["metrics"]
            same = [k for k in reply if "seconds" not in k]
            assert set(same) <= set(m["metrics"]), (reply, m["metrics"])
            for key in same:
                assert m["metrics"][key] == pytest.approx(float(reply[key]), rel=1e-6), key
    small = measured["select"]["small"]["metrics"]
    assert any(k.startswith("score:") for k in small)
    assert 0 < small["peak-resident-bytes"] <= budgets["small"]
    assert "loss_first" in measured["adapt"]["small"]["metrics"]  # an assembly: trained
    assert set(state.history[1]["client_memory"]) == {"big", "small"}
    assert any("client memory, tier small (select)" in line for line in lines)


def test_measure_memory_builds_no_content_once_every_tier_of_a_phase_is_measured():
    """A phase whose tiers are all measured (this run, or the run a resume continues)
    costs its rounds nothing: the round's content is not built for measuring."""
    from types import SimpleNamespace

    from assy.federation.server import measure_tiers
    from assy.federation.tiers import Population, Tier

    class Method:
        def phase(self, round_):
            return "select" if round_ == 1 else "adapt"

        def content(self, round_):
            raise AssertionError(f"round {round_}'s content built for nothing")

    tiers = [Tier("big", 0.5, None), Tier("small", 0.5, 2**30)]
    pop = Population(node_of={}, tiers=tiers, tier_of=[0, 1], sizes=[1, 1], eligible=[0, 1])
    state = SimpleNamespace(facts={"client_memory": {"adapt": {"big": {}, "small": {}}}})
    assert measure_tiers(Method(), pop, SimpleNamespace(clients=2), 2, state, print) == {}
    with pytest.raises(AssertionError, match="round 1's content"):  # select: still to measure
        measure_tiers(Method(), pop, SimpleNamespace(clients=2), 1, state, print)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_held_memory_is_what_the_round_holds_beyond_where_it_began():
    """What a round holds besides the swapper comes off the swapper's share of the budget:
    it grows with what the round keeps and falls back when that is freed."""
    from assy.federation.held import HeldMemory

    held = HeldMemory()
    kept = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident
    assert held.held() >= 60 * 2**20
    del kept
    assert held.held() < 16 * 2**20
