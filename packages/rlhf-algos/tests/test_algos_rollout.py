"""rlhf_algos.generate_responses: the one home of "generate, then the response mask, then the
attention mask of prompt + response", on scripted responses whose masks are written out by hand."""

from __future__ import annotations

import torch
from rlhf_algos import GeneratedBatch, generate_responses
from rlhf_algos.testing import ScriptedPolicy

V, EOS, PAD = 10, 9, 0


class _Recording(ScriptedPolicy):
    """Records the keyword arguments ``generate`` was called with."""

    def generate(self, input_ids, attention_mask, **kw):
        self.kw = kw
        return super().generate(input_ids, attention_mask, **kw)


def test_masks_cover_the_response_up_to_and_including_the_first_eos() -> None:
    prompts = torch.tensor([[0, 3, 4], [5, 6, 7]])  # left-padded: row 0 has a 2-token prompt
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.int32)
    policy = _Recording(V, [[1, EOS, 2], [3, 4, 5]])  # row 0 stops at its EOS; the 2 after it is not its
    gen = generate_responses(policy, prompts, prompt_mask, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    assert isinstance(gen, GeneratedBatch) and gen.prompt_len == 3 and gen.logprobs is None
    assert gen.sequences.tolist() == [[0, 3, 4, 1, EOS, 2], [5, 6, 7, 3, 4, 5]]
    assert gen.response_mask.dtype == torch.float32
    assert gen.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert gen.attention_mask.dtype == torch.int64
    assert gen.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # the sampling arguments reach the policy as given (the protocol's defaults otherwise)
    assert policy.kw == {"max_new_tokens": 3, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                         "eos_token_id": EOS, "pad_token_id": PAD, "return_logprobs": False}


def test_generator_logprobs_are_kept_when_asked_for() -> None:
    policy = _Recording(V, [[1, EOS, 2]])
    gen = generate_responses(policy, torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), max_new_tokens=3,
                             eos_token_id=EOS, pad_token_id=PAD, do_sample=False, temperature=0.7, return_logprobs=True)
    assert policy.kw["do_sample"] is False and policy.kw["temperature"] == 0.7
    assert gen.logprobs.shape == (1, 3) and gen.logprobs.dtype == torch.float32
    assert gen.logprobs[0, 2] == 0.0 and gen.logprobs[0, :2].lt(0).all()  # 0 after the first EOS


def test_without_an_eos_every_response_token_counts() -> None:
    gen = generate_responses(ScriptedPolicy(V, [[1, 2]]), torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.long),
                             max_new_tokens=2, eos_token_id=None, pad_token_id=PAD)
    assert gen.response_mask.tolist() == [[1.0, 1.0]] and gen.attention_mask.tolist() == [[1, 1, 1]]
