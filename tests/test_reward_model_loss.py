"""reward_model's loss options: Llama 2's margin (from the data's `margin` column) and reward centering."""
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from tasks.base import BadInput
from tasks.tables import read_table, write_table
from tasks.train.losses import bradley_terry_loss
from tasks.train.reward_model import RewardModelParams, bt_step, collate_pairs, evaluate_pairs


class ScoreTable(torch.nn.Module):
    """A stand-in reward model: the score of a sequence is a learnable weight picked by its first token."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.scores[input_ids[:, 0]].unsqueeze(-1))


PAIRS = [{"chosen": [0, 9], "rejected": [1], "margin": 0.5}, {"chosen": [2], "rejected": [3, 9, 9], "margin": 2.0}]
SCORES = [1.0, -0.5, 0.25, 0.75]


def test_collate_carries_margins():
    batch = collate_pairs(PAIRS, pad_id=9)
    assert batch["input_ids"].tolist() == [[0, 9, 9], [2, 9, 9], [1, 9, 9], [3, 9, 9]]
    assert batch["margin"].tolist() == [0.5, 2.0]
    assert "margin" not in collate_pairs([{"chosen": [0], "rejected": [1]}], pad_id=9)


@pytest.mark.parametrize("with_margin", [False, True])
def test_bt_step_uses_margin_and_centering(with_margin):
    pairs = PAIRS if with_margin else [{"chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
    model = ScoreTable(SCORES)
    loss, metrics = bt_step(model, collate_pairs(pairs, pad_id=9), center_rewards_coefficient=0.1)
    loss.backward()
    chosen = torch.tensor([SCORES[0], SCORES[2]], requires_grad=True)
    rejected = torch.tensor([SCORES[1], SCORES[3]], requires_grad=True)
    margin = torch.tensor([0.5, 2.0]) if with_margin else None
    expected = bradley_terry_loss(chosen, rejected, margin, center_coefficient=0.1).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.scores.grad.tolist() == pytest.approx(
        [chosen.grad[0].item(), rejected.grad[0].item(), chosen.grad[1].item(), rejected.grad[1].item()], rel=1e-6
    )
    assert metrics["accuracy"].item() == 0.5
    # the evaluation's loss is the same loss
    evaluation = evaluate_pairs(model, pairs, pad_id=9, center_rewards_coefficient=0.1)
    assert evaluation == {"accuracy": 0.5, "loss": pytest.approx(expected.item(), rel=1e-6)}


def test_params():
    base = {"kind": "reward_model", "model": "m", "data": "d"}
    p = RewardModelParams.model_validate(base)
    assert p.margin is False and p.center_rewards_coefficient == 0.0
    p = RewardModelParams.model_validate({**base, "margin": True, "center_rewards_coefficient": 0.01})
    assert p.margin is True and p.center_rewards_coefficient == 0.01
    with pytest.raises(ValidationError, match="center_rewards_coefficient"):
        RewardModelParams.model_validate({**base, "center_rewards_coefficient": -0.1})


def test_stage_trains_with_margin_and_centering(tiny_demo_model, demo_table, run_stage):
    params = {"kind": "reward_model", "model": "m", "data": "d", "eval_data": "e", "epochs": 0.5, "batch_size": 16,
              "margin": True, "center_rewards_coefficient": 0.01}
    data = demo_table("preferences", 64)
    assert "margin" in read_table(data).column_names
    _, metrics = run_stage(params, {"model": tiny_demo_model, "data": data, "eval_data": data})
    assert {"loss", "accuracy", "eval_loss", "eval_accuracy"} <= set(metrics)


def test_missing_margin_column_names_the_table(tmp_path, tiny_demo_model, demo_table, run_stage):
    table = read_table(demo_table("preferences", 64))
    no_margin = tmp_path / "no_margin"
    no_margin.mkdir()
    write_table(table.drop_columns(["margin"]), no_margin)
    params = {"kind": "reward_model", "model": "m", "data": "prefs_without_margin", "epochs": 0.5, "margin": True}
    with pytest.raises(BadInput, match="'margin' column in table 'prefs_without_margin'") as error:
        run_stage(params, {"model": tiny_demo_model, "data": no_margin})
    assert error.value.field == "margin" and error.value.file.endswith("data.parquet")
    # without margin: true the column is not needed
    run_stage({**params, "margin": False}, {"model": tiny_demo_model, "data": no_margin})
