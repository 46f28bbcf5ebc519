"""Self-stitch on the real SmolLM2 (AssyLLM's seam check): cut after layer 15 and re-joined
through an adapter fitted in closed form, perplexity stays within 1%; the same with a random
orthogonal rotation inserted at the seam, which the fitted adapter must undo."""

import pytest
import torch
from torch import nn

from assy.assembly import ElasticAdapter, FitOptions, Recipe, SeamSpec, Slice, fit_assembly
from assy.assembly.assemble import fit_seam, seam_targets
from assy.assembly.calibration import FitData, passages_text, token_windows
from assy.assembly.chain import build_items, new_adapters
from assy.assembly.states import StateCache, own_states
from assy.evaluate import perplexity
from blockpool import ChainRunner, Pool, RunOptions, Seam

pytestmark = [pytest.mark.real, pytest.mark.slow]

ANCHOR = "smollm2-135m"


class _Rotated(Seam):
    def __init__(self, q, inner):
        super().__init__()
        self.register_buffer("q", q)
        self.inner = inner

    def forward(self, hidden, context):
        return self.inner(hidden @ self.q.T, context)


def test_self_stitch_stays_within_one_percent_and_undoes_a_rotation(real_pool, heldout_file):
    pool = Pool(real_pool)
    tokenizer = pool.tokenizer(ANCHOR)
    text = heldout_file.read_text()

    def ppl(chain):
        runner = ChainRunner(pool, chain)
        return perplexity(runner, tokenizer, text, max_tokens=1024, progress=False)["perplexity"]

    fit_text = passages_text(20_000, 200_000)  # the same source, never the held-out passages
    assert not set(fit_text.split("\n\n")) & set(text.split("\n\n"))
    options, cache = RunOptions(threads=1), StateCache()
    fit = FitOptions(samples=16, seq_len=256)
    recipe = Recipe(ANCHOR, (Slice(ANCHOR, (0, 15)), Slice(ANCHOR, (16, 29))), (SeamSpec(1),))
    fitted = fit_assembly(pool, recipe, FitData(fit_text), fit, options=options, cache=cache)
    items = build_items(fitted.recipe, pool, fitted.adapters)

    intact = ppl(pool.model(ANCHOR).blocks)
    stitched = ppl(items)
    assert abs(stitched / intact - 1) < 0.01, (intact, stitched)

    windows = token_windows(tokenizer, fit_text, fit.samples, fit.seq_len, seed=fit.seed)
    q, _ = torch.linalg.qr(torch.randn(576, 576, generator=torch.Generator().manual_seed(0)))
    x = own_states(pool, ANCHOR, windows.ids, None, [16], options=options, cache=cache)[16]
    adapter = new_adapters(fitted.recipe, pool, 0)[1]
    pairs, first, _ = seam_targets(pool, fitted.recipe, ANCHOR, 16, windows, options, cache)
    fit_seam(adapter, x @ q.T, pairs, first, windows.validation, fit)
    rotated = ppl([_Rotated(q, adapter) if isinstance(i, nn.Module) else i for i in items])
    assert abs(rotated / intact - 1) < 0.01, (intact, rotated)
    control = [
        _Rotated(q, ElasticAdapter(576, 576)) if isinstance(i, nn.Module) else i for i in items
    ]
    assert ppl(control) > 10 * intact  # the rotation does break the model unless undone
