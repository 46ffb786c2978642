"""SFT and reward-model training as algorithms (rlhf_algos.SFT, rlhf_algos.RM), on the test doubles:
the loss each step takes is the functional one on the pre-step model, masks and accuracies are
worked out by hand."""

from __future__ import annotations

import pytest
import torch
from rlhf_algos import RM, SFT, RMConfig, SFTConfig, pairwise_reward_loss, sft_loss
from rlhf_algos.sft import target_mask
from rlhf_algos.testing import TinyPolicy, TinyScorer
from rlhf_data import IGNORE_INDEX

V, PAD = 12, 0
# prompt_len 2: tokens 0-1 are the prompt, the rest the response (EOS = 11)
DEMOS = [{"input_ids": [3, 4, 5, 11], "prompt_len": 2}, {"input_ids": [6, 7, 8, 9, 11], "prompt_len": 2},
         {"input_ids": [2, 5, 11], "prompt_len": 2}]
# TinyScorer scores a row by its last token alone, so the pairs end on different tokens
PAIRS = [{"chosen_ids": [3, 4, 5], "rejected_ids": [3, 4, 6], "meta": {}},
         {"chosen_ids": [7, 8], "rejected_ids": [7, 9, 10], "meta": {}}]


def test_target_mask_covers_the_response_tokens_only() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 11, IGNORE_INDEX]])  # prompt, response + EOS, pad
    # position j scores token j + 1: tokens 2 (5) and 3 (EOS) count
    assert target_mask(labels).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_sft_step_takes_the_token_mean_nll_of_the_pre_step_model() -> None:
    policy = TinyPolicy(V, seed=1)
    sft = SFT(SFTConfig(), policy=policy)
    batch = sft.collate(DEMOS, PAD)
    # 2 + 3 + 1 response tokens (EOS included); the prompts carry no loss
    assert int(target_mask(batch["labels"]).sum()) == 6
    with torch.no_grad():
        lp = policy.token_logprobs(batch["input_ids"], batch["attention_mask"], 1)
        want = sft_loss(lp, target_mask(batch["labels"])).loss.item()
    got = sft.learn(batch)
    assert set(got) == {"loss"} and got["loss"] == pytest.approx(want, rel=1e-6)
    assert policy.steps == 1
    for _ in range(30):
        sft.learn(batch)
    assert sft.evaluate(DEMOS, PAD) < want  # it learns the demonstrations


def test_sft_without_prompt_masking_also_learns_the_prompt() -> None:
    batch = SFT(SFTConfig(mask_prompt=False), policy=TinyPolicy(V)).collate(DEMOS, PAD)
    assert int(target_mask(batch["labels"]).sum()) == 3 + 4 + 2  # every token after the first


def test_sft_evaluate_weights_batches_by_their_tokens() -> None:
    policy = TinyPolicy(V, seed=2)
    sft = SFT(SFTConfig(), policy=policy)
    one_batch = sft.evaluate(DEMOS, PAD, batch_size=64)
    per_row = sft.evaluate(DEMOS, PAD, batch_size=1)
    assert one_batch == pytest.approx(per_row, rel=1e-6)
    # by hand: the mean over the 6 response tokens of -log p
    b = sft.collate(DEMOS, PAD)
    with torch.no_grad():
        lp = policy.token_logprobs(b["input_ids"], b["attention_mask"], 1)
    m = target_mask(b["labels"])
    assert one_batch == pytest.approx((-(lp * m).sum() / m.sum()).item(), rel=1e-6)
    assert policy.module.training  # left in train mode


class _PackedPolicy(TinyPolicy):
    """TinyPolicy that accepts packed rows (a bigram model needs no attention mask)."""

    def token_logprobs(self, input_ids, attention_mask, start=1, *, position_ids=None, **kw):
        self.saw_position_ids = position_ids
        return super().token_logprobs(input_ids, attention_mask, start, **kw)


def test_sft_with_packing_passes_position_ids_and_no_attention_mask() -> None:
    from rlhf_data import pack_sft

    policy = _PackedPolicy(V)
    sft = SFT(SFTConfig(packing=True), policy=policy)
    rows = pack_sft(DEMOS, max_len=16)
    batch = sft.collate(rows, PAD)
    assert "attention_mask" not in batch
    sft.learn(batch)
    assert torch.equal(policy.saw_position_ids, batch["position_ids"])


def test_rm_step_takes_the_pairwise_loss_with_the_centring_term() -> None:
    model = TinyScorer(V, seed=3)
    rm = RM(RMConfig(center_coef=0.5), model=model)
    from rlhf_data import collate_pairs

    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        s = model.score(batch["input_ids"], batch["attention_mask"])
        want = pairwise_reward_loss(s[:2], s[2:], center_coef=0.5)
    got = rm.learn(batch)
    assert list(got) == ["loss", "train_accuracy", "margin"]
    assert got["loss"] == pytest.approx(want.loss.item(), rel=1e-6)
    assert got["train_accuracy"] == want.accuracy.item() and got["margin"] == pytest.approx(want.margin.item())
    for _ in range(50):
        rm.learn(batch)
    assert rm.evaluate(PAIRS, PAD)["accuracy"] == 1.0  # it separates the training pairs
    with pytest.raises(ValueError, match="2B rows"):
        rm.learn({"input_ids": batch["input_ids"][:3], "attention_mask": batch["attention_mask"][:3]})


class _FirstTokenScorer:
    """A row's score is its first token."""

    def eval(self) -> None: ...

    def train(self) -> None: ...

    def score(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ids[:, 0].float()


@pytest.mark.parametrize("batch_size", [2, 64])  # 64, the default: the pairs in one batch
def test_rm_evaluate_counts_ties_half_and_undoes_flipped_labels(batch_size: int) -> None:
    pairs = [{"chosen_ids": [5], "rejected_ids": [3], "meta": {}},  # right
             {"chosen_ids": [2], "rejected_ids": [2], "meta": {}},  # tie: 0.5
             {"chosen_ids": [1], "rejected_ids": [4], "meta": {"flipped": True}}]  # wrong as labelled, right truly
    acc = RM(RMConfig(), model=_FirstTokenScorer()).evaluate(pairs, pad_token_id=0, batch_size=batch_size)
    assert acc["accuracy"] == pytest.approx(2.5 / 3) and acc["accuracy_noisy_labels"] == pytest.approx(1.5 / 3)
    assert acc["score_mean"] == pytest.approx((5 + 2 + 1 + 3 + 2 + 4) / 6)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_rm_config_rejects_a_bad_center_coef(value: float) -> None:
    with pytest.raises(ValueError, match=r"rm\.center_coef: .* is not allowed; allowed: a finite number >= 0"):
        RMConfig(center_coef=value)


def test_configs_are_type_checked() -> None:
    with pytest.raises(TypeError, match="config must be a SFTConfig"):
        SFT(RMConfig(), policy=TinyPolicy(V))
    with pytest.raises(TypeError, match="config must be a RMConfig"):
        RM(SFTConfig(), model=TinyScorer(V))
