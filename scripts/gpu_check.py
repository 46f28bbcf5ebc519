"""Check the block runner on a CUDA GPU: round trip of every family, KV-cache decoding, a
two-model chain and a budgeted run, each against the CPU or the unbudgeted result.

    scripts/gpu_check.sh            # exit 0: all match (or no GPU here); 1: a mismatch
    scripts/gpu_check.sh cpu        # the same checks on the CPU (a dry run of this script)

Run on a machine with a GPU; on one without, it says so and exits 0.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(device: str = "cuda") -> int:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing checked")
        return 0
    from tiny_models import TINY, V
    from torch import nn

    from blockpool import BlockRunner, ChainRunner, Pool, RunOptions, build_pool, open_runner
    from blockpool.offload import min_budget

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []

    def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4) -> None:
        err = (got.float().cpu() - want.float().cpu()).abs().max().item()
        ok = err <= atol
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {err:.2e} (atol {atol:g})")
        if not ok:
            failures.append(name)

    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family, make in sorted(TINY.items()):
            torch.manual_seed(0)
            model = make().eval()
            model.save_pretrained(tmp / family)
            build_pool([f"{family}={tmp / family}"], tmp / "pools" / family, dtype="fp32")
            pool = Pool(tmp / "pools" / family)
            runner = BlockRunner(pool, family, device=device)
            with torch.inference_mode():
                out = runner.forward(ids, mask)
                ref = model(input_ids=ids, attention_mask=mask)
            if runner.is_causal:
                check(f"{family} round trip", out.logits, ref.logits)
                full = runner(ids[:1])
                step = runner.forward(ids[:1, :6], use_cache=True)
                parts = [step.logits]
                for t in range(6, ids.shape[1]):
                    step = runner.forward(
                        ids[:1, t : t + 1], past_key_values=step.past_key_values, use_cache=True
                    )
                    parts.append(step.logits)
                check(f"{family} KV-cache decoding", torch.cat(parts, 1), full)
            else:
                keep = mask.bool()
                check(f"{family} round trip", out.hidden[keep], ref.last_hidden_state[keep])

        sources = [f"llama={tmp / 'llama'}", f"llama2={tmp / 'llama'}"]
        build_pool(sources, tmp / "chain", dtype="fp32")
        pool = Pool(tmp / "chain")
        blocks = pool.model("llama").blocks
        chain = [blocks[0], blocks[1], nn.Identity(), pool.model("llama2").blocks[2], blocks[3]]
        check(
            "two-copy chain with an identity seam",
            ChainRunner(pool, chain, device=device)(ids, mask),
            BlockRunner(pool, "llama")(ids, mask),
        )
        budget = min_budget(pool, "llama", batch=2, tokens=12)
        with open_runner(pool, "llama", RunOptions(budget=budget, device=device)) as run:
            got = run.runner(ids, mask)
        check(
            f"budgeted run ({device}) vs resident (cpu)", got, BlockRunner(pool, "llama")(ids, mask)
        )
        peak = run.report["weights_resident_peak_bytes"]
        print(f"{'ok  ' if peak <= budget else 'FAIL'} budget kept: {peak} <= {budget} B")
        if peak > budget:
            failures.append("budget")
    print(f"gpu_check: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
