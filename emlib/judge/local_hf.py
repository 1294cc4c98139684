"""A local Hugging Face chat model as judge: every number string 0-100 scored, several prompts in one forward pass.

The papers' single-token rule needs a tokenizer that spells each integer 0-100 as one token (OpenAI's does); Qwen,
Llama and most local models split "73" into "7" + "3", so the first token's top-20 would read 73 as 7. Here
P(k) = P(the tokens of str(k) | prompt) x P(the next token does not continue the number), for all 101 numbers.

The 101 token strings share prefixes ("7" starts "7", "70" ... "79"), so they form a small tree (about 111 nodes
for a digit-by-digit tokenizer). Each prompt is followed by the tree's tokens, with an attention mask that lets a
node see the prompt and its own ancestors only, and positions that continue the prompt: one forward pass gives
every distribution P(k) needs, with no copy of the prompt's cache per candidate. Prompts of different lengths are
left-padded into one batch, so ``batch_size`` prompts cost one pass.

``numbers`` picks the scoring rule the judge's alternatives are read with (:attr:`Judge.min_mass`): ``"rule"`` is
the papers' (no score under 0.25 of the probability on numbers), ``"renormalise"`` scores among the numbers
whatever their share; a small local judge puts a few % on numbers, so under the rule it scores nothing. Either way
the alternatives are the raw probabilities, so the frame's ``<metric>_number_mass`` column reports the share.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from emlib.judge.backends import LOGPROB_FLOOR, NUMBER_MODES, Judge
from emlib.judge.cache import JudgeStats
from emlib.judge.replies import Alternatives, Reply
from emlib.judge.rubrics import number_of
from emlib.judge.server import BatchWorker
from emlib.openai_client import CircuitBreaker


@dataclass(frozen=True)
class NumberTree:
    """The token strings of the numbers 0-100 as a prefix tree: one node per distinct token prefix."""

    tokens: tuple[int, ...]  # the token of each node
    parents: tuple[int, ...]  # the parent node of each node; -1: the prompt
    depths: tuple[int, ...]  # 1 for a number's first token
    paths: tuple[tuple[int, ...], ...]  # per number 0-100: its nodes, first token first

    @classmethod
    def build(cls, candidates: Sequence[Sequence[int]]) -> NumberTree:
        index: dict[tuple[int, ...], int] = {}
        tokens, parents, depths, paths = [], [], [], []
        for ids in candidates:
            if not ids:
                raise ValueError("a number encodes to no tokens: the judge's tokenizer cannot spell it")
            path = []
            for depth in range(1, len(ids) + 1):
                prefix = tuple(ids[:depth])
                if prefix not in index:
                    index[prefix] = len(tokens)
                    tokens.append(ids[depth - 1])
                    parents.append(path[-1] if path else -1)
                    depths.append(depth)
                path.append(index[prefix])
            paths.append(tuple(path))
        return cls(tuple(tokens), tuple(parents), tuple(depths), tuple(paths))

    def ancestry(self):
        """Bool [nodes, nodes]: node i may attend to node j (j is i or one of its ancestors)."""
        import torch

        n = len(self.tokens)
        allowed = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            j = self.parents[i]
            while j >= 0:
                allowed[i, j] = True
                j = self.parents[j]
        return allowed


class LocalHFJudge(Judge):
    """A local Hugging Face chat model as judge, scoring *every* number string 0-100, however it tokenizes.

    The alternatives are those 101 numbers (plus the most likely first token when it is a word, so REFUSAL / CODE
    are recognised), so :func:`~emlib.judge.rubrics.aggregate_logprobs` applies unchanged. ``numbers``: ``"rule"``
    (the papers' 0.25 threshold) or ``"renormalise"`` (score among numbers whatever their share). ``batch_size``
    prompts go through the model in one forward pass; concurrent :meth:`ascore` calls (``judge_frame``) are
    gathered into such batches by one worker thread. ``None``: 8 on a GPU, 1 on a CPU, where batching only adds
    padding (bench/bench_judge.py hf, 115M judge, 2 cores: 8 per pass ran 0.66-0.77x one per pass).
    """

    method = "hf-number-strings"

    def __init__(self, model, tokenizer, name: str | None = None, system: str | None = None,
                 numbers: str = "rule", batch_size: int | None = None):
        if numbers not in NUMBER_MODES:
            raise ValueError(f"numbers must be one of {NUMBER_MODES}, not {numbers!r}")
        if batch_size is None:
            on_gpu = next(model.parameters()).device.type != "cpu"
            batch_size = 8 if on_gpu else 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
        if attention.startswith("flash"):
            raise ValueError(f"LocalHFJudge needs a custom attention mask: load the judge with attn_implementation "
                             f"'sdpa' or 'eager', not {attention!r}")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.numbers, self.batch_size = numbers, batch_size
        where = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.name = name or f"hf:{where}"
        self.candidates = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(101)]
        self.tree = NumberTree.build(self.candidates)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        # raw token strings: a leading-space/"▁" digit token starts a new word, so it does not continue the number
        self.continues = [i for i, t in enumerate(tokens) if t and t[0].isdigit()]
        self._lock = threading.Lock()  # one forward pass at a time (the worker, or a direct call)
        self._worker: BatchWorker | None = None

    def render(self, messages: list[dict]) -> list[int]:
        """Prompt ids: the chat template with a generation prompt (plain text for a model without a template)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def messages(self, prompt: str) -> list[dict]:
        """The chat a filled rubric is judged as (with the judge's system prompt, if any)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": prompt}]

    # -------------------------------------------------------------------------------------------- scoring

    def number_logprobs(self, messages: list[dict]) -> tuple[list[float], tuple[str, float]]:
        """log P(k) for k = 0..100 as complete answers, and the most likely first token with its logprob (so a
        REFUSAL / CODE reply can be recognised)."""
        return self.number_logprobs_batch([messages])[0]

    def number_logprobs_batch(self, conversations: Sequence[list[dict]]) -> list[tuple[list[float], tuple[str, float]]]:
        """:meth:`number_logprobs` of every conversation, ``batch_size`` per forward pass."""
        prompts = [self.render(m) for m in conversations]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._score_prompts(prompts[start:start + self.batch_size])
        return out

    def _inputs(self, prompts: list[list[int]]):
        """Input ids, positions and additive attention mask of left-padded prompts each followed by the tree."""
        import torch

        tree, n_nodes, width = self.tree, len(self.tree.tokens), max(map(len, prompts))
        total, rows = width + n_nodes, len(prompts)
        ids = torch.full((rows, total), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros((rows, total), dtype=torch.long)
        allowed = torch.zeros((rows, total, total), dtype=torch.bool)
        causal, ancestry = torch.ones(width, width, dtype=torch.bool).tril(), tree.ancestry()
        depths = torch.tensor(tree.depths)
        for row, prompt in enumerate(prompts):
            n, pad = len(prompt), width - len(prompt)
            ids[row, pad:width] = torch.tensor(prompt)
            ids[row, width:] = torch.tensor(tree.tokens)
            positions[row, pad:width] = torch.arange(n)
            positions[row, width:] = n - 1 + depths  # a node continues the prompt at its depth
            allowed[row, pad:width, pad:width] = causal[:n, :n]
            allowed[row, width:, pad:width] = True  # every node sees the whole prompt ...
            allowed[row, width:, width:] = ancestry  # ... and its ancestors, never a sibling's digits
            allowed[row, range(pad), range(pad)] = True  # padding sees itself: no empty softmax row
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return ids, positions, mask[:, None]

    def _score_prompts(self, prompts: list[list[int]]) -> list[tuple[list[float], tuple[str, float]]]:
        import torch

        tree, n_nodes = self.tree, len(self.tree.tokens)
        device = next(self.model.parameters()).device
        ids, positions, mask = (t.to(device) for t in self._inputs(prompts))
        with self._lock, torch.no_grad():
            # only the last prompt position and the tree's nodes need logits
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=n_nodes + 1).logits.float()
            norm = torch.logsumexp(logits, -1)  # [rows, 1 + nodes]: row 0 follows the prompt, row 1 + i node i
        source = torch.tensor(tree.parents, device=device) + 1  # the distribution each node's token is drawn from
        token = torch.tensor(tree.tokens, device=device)
        steps = logits[:, source, token] - norm[:, source]  # [rows, nodes]: log P(node's token | its prefix)
        if self.continues:
            digits = (logits[:, 1:, self.continues] - norm[:, 1:, None]).exp().sum(-1)
            stop = torch.log1p(-digits.clamp(max=1 - 1e-7))  # [rows, nodes]: the number ends after this node
        else:
            stop = torch.zeros_like(steps)
        member = torch.zeros(101, n_nodes, device=device)
        for k, path in enumerate(tree.paths):
            member[k, list(path)] = 1.0
        ends = torch.tensor([path[-1] for path in tree.paths], device=device)
        numbers = steps @ member.T + stop[:, ends]  # [rows, 101]
        first = logits[:, 0] - norm[:, :1]
        best = first.argmax(-1)
        return [(numbers[r].tolist(), (self.tokenizer.decode([int(best[r])]), float(first[r, best[r]])))
                for r in range(len(prompts))]

    # -------------------------------------------------------------------------------------------- replies

    def alternatives(self, messages: list[dict]) -> Alternatives:
        """All 101 numbers with their log-probabilities, best first (plus the top first token when it is a word)."""
        return self.alternatives_batch([messages])[0]

    def alternatives_batch(self, conversations: Sequence[list[dict]]) -> list[Alternatives]:
        """:meth:`alternatives` of every conversation, ``batch_size`` per forward pass."""
        out = []
        for logps, (token, logprob) in self.number_logprobs_batch(conversations):
            alts = [(str(k), max(lp, LOGPROB_FLOOR)) for k, lp in enumerate(logps)]
            if number_of(token) is None and token.strip():
                alts.append((token.strip(), logprob))  # a word first (REFUSAL, CODE, ...): no numeric mass
            out.append(sorted(alts, key=lambda x: -x[1]))
        return out

    def _replies(self, prompts: list[str]) -> list[Reply]:
        conversations = [self.messages(p) for p in prompts]
        return [Reply(alts, len(self.render(m)), 1)
                for alts, m in zip(self.alternatives_batch(conversations), conversations)]

    async def open(self) -> None:
        if self._worker is None:
            # no queue bound here: judge_frame's max_in_flight bounds what is waiting
            self._worker = BatchWorker(self._replies, batch_size=self.batch_size, max_queue=0,
                                       name=f"emlib-judge-{self.name}")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    async def ascore(self, prompt: str, stats: JudgeStats, breaker: CircuitBreaker | None = None) -> Reply:
        """The reply to one filled rubric; calls in flight together are scored in shared forward passes."""
        await self.open()
        return await asyncio.wrap_future(self._worker.submit(prompt))
