"""lm-evaluation-harness on pool models: ``AssyLM``, registered as lm-eval's model ``assy``.

Every lm-eval task then runs on a pool model (or an assembly, within a budget), through
lm-eval's own CLI (``assy lm-eval --model assy --model_args pool=DIR,model=NAME ...``) or
its Python API::

    import lm_eval
    from assy.evaluation.harness import AssyLM

    lm = AssyLM(pool="pool", model="smollm2-135m", budget="300MB")
    results = lm_eval.simple_evaluate(model=lm, tasks=["piqa"], limit=100)

``loglikelihood`` is lm-eval's own (its tokenization, via ``TemplateLM``), scored by
:func:`assy.evaluation.scoring.score` (shared contexts, logits only where scored);
``loglikelihood_rolling`` is lm-eval's rolling-window protocol (its perplexity tasks mean
what they mean there); ``generate_until`` decodes greedily with the runner's KV cache.
Needs ``pip install assy[lm-eval]`` (lm-eval 0.4.x).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from assy.errors import UsageError
from assy.evaluation.head import head_logprobs
from assy.evaluation.scoring import HEAD_BYTES, Request, model_max_length, score
from assy.progress import bar
from blockpool import Pool, RunOptions, open_runner, parse_size

__all__ = ["AssyLM", "check_model_args"]

log = logging.getLogger(__name__)

_MAX_GEN_TOKS = 256  # lm-eval's default


def _target(pool: Pool, model: str | None, assembly: str | None) -> tuple[Any, str]:
    """The runner target and the name of the model whose tokenizer it uses."""
    if (model is None) == (assembly is None):
        raise UsageError("model_args take model=NAME or assembly=DIR (one of them)")
    if model is not None:
        pool.model(model)  # an unknown name is refused here, naming the pool's models
        return model, model
    try:
        from assy.assembly import load_assembly  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("assembly=DIR needs assy.assembly, which this install lacks") from None
    loaded = load_assembly(pool, Path(assembly))
    return loaded.chain, loaded.anchor


def check_model_args(text: str | None) -> None:
    """Refuse ``--model_args`` that :class:`AssyLM` would refuse, before lm-eval starts
    (a missing pool, an unknown model, a bad budget): one line instead of lm-eval's log.

    Raises:
        AssyError: what :class:`AssyLM` would raise.
    """
    from lm_eval.utils import simple_parse_args_string

    kwargs = simple_parse_args_string(text)
    if "pool" not in kwargs:
        raise UsageError("--model assy needs --model_args pool=DIR,model=NAME (or assembly=DIR)")
    _target(Pool(str(kwargs["pool"])), kwargs.get("model"), kwargs.get("assembly"))
    if isinstance(kwargs.get("budget"), str):
        parse_size(kwargs["budget"])


@register_model("assy")
class AssyLM(TemplateLM):
    """lm-eval's ``LM`` interface on a pool model or chain.

    Args:
        pool: the pool directory.
        model: a model name of the pool, or
        assembly: an assembly directory (its anchor gives the tokenizer).
        budget: most resident weight bytes (``300MB``; through the swapper), or ``None``.
        device, dtype, threads, swap_policy: as ``assy eval``'s flags.
        batch_size: sequences per forward call (lm-eval's ``--batch_size``; ``auto`` is 8).
        max_length: most tokens per request; default: the model's own limit.
        **kwargs: other arguments lm-eval passes (``max_batch_size``), ignored.
    """

    def __init__(
        self,
        pool: str,
        model: str | None = None,
        assembly: str | None = None,
        budget: str | int | None = None,
        device: str | None = None,
        dtype: str = "fp32",
        threads: int | str | None = None,
        swap_policy: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        opened = Pool(pool)
        target, name = _target(opened, model, assembly)
        size = int(batch_size) if str(batch_size or "auto").isdigit() else 8
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning(
                "device %s: no CUDA GPU here, using cpu (as lm-eval's hf model does)", device
            )
            device = "cpu"
        options = RunOptions(
            budget=parse_size(budget) if isinstance(budget, str) else budget,
            dtype=dtype,
            device=device or "cpu",
            batch_size=size,
            threads=int(threads) if threads is not None else None,
            **({"policy": swap_policy} if swap_policy else {}),
        )
        self.tokenizer = opened.tokenizer(name)
        self._stack = ExitStack()
        self.session = self._stack.enter_context(open_runner(opened, target, options))
        self.runner = self.session.runner
        self._max_length = int(max_length) if max_length else model_max_length(self.runner)
        self._batch_size = size
        self._device = self.runner.device
        self.model_name = name

    def close(self) -> None:
        """Close the runner (the swapper's threads); ``self.session.report`` is then final."""
        self._stack.close()

    # --- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """lm-eval's HF encoding: default special tokens, none if ``string`` starts with the
        prefix token's text; optionally the last ``left_truncate_len`` tokens only."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode(self.prefix_token_id))
        ids = list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _score(self, requests: list[Request], disable_tqdm: bool) -> list[Any]:
        pad = self.tokenizer.pad_token_id
        return score(
            self.runner,
            requests,
            batch_size=self._batch_size,
            max_length=self._max_length,
            pad_id=int(pad if pad is not None else self.eot_token_id or 0),
            progress=not disable_tqdm,
            desc="loglikelihood",
        )

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        scored = self._score(
            [Request(tuple(ctx), tuple(cont)) for _, ctx, cont in requests],
            kwargs.get("disable_tqdm", False),
        )
        out = []
        for (key, _, _), s in zip(requests, scored, strict=True):
            answer = (s.loglik, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    # --- perplexity ---------------------------------------------------------------------
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows: every token scored once, each window as long as the
        model allows, the first conditioned on the prefix token."""
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append(Request(tuple(context), tuple(pred)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, s in zip(owner, self._score(windows, disable_tqdm), strict=True):
            totals[k] += s.loglik
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop sequence, EOS or ``max_gen_toks`` (one request at a
        time, with the runner's KV cache)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for req in bar(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise UsageError("assy's generate_until decodes greedily (do_sample=False only)")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            limit = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or _MAX_GEN_TOKS)
            ids = self.tok_encode(context, left_truncate_len=self._max_length - limit)
            text = self.tok_decode(self._greedy(ids, limit, until))
            text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _greedy(self, ids: list[int], limit: int, until: list[str]) -> list[int]:
        new: list[int] = []
        cache = None
        step = torch.tensor([ids])
        for _ in range(limit):
            out = self.runner.forward(step, past_key_values=cache, use_cache=True, head=False)
            cache = out.past_key_values
            _, top = head_logprobs(
                self.runner.fetch(self.runner.block_ids[-1]),
                out.hidden[0, -1:],
                torch.full((1, 1), -1),
                vocab=self.runner.config_of(self.runner.block_ids[-1]).vocab_size,
                head_bytes=HEAD_BYTES,
            )
            token = int(top[0])
            new.append(token)
            if token == self.eot_token_id:
                break
            if any(stop and stop in self.tok_decode(new) for stop in until):
                break
            step = torch.tensor([[token]])
        return new
