"""A tiny reward model with the interface of RLHFlow/ArmoRM-Llama3-8B-v0.1, shipped as custom code.

Loaded only with `trust_remote_code=True`. Its forward returns an output object whose `.score` holds one
preference score per sequence, read at the last non-padding token, like ArmoRM's. `config.score_mode` makes
test fixtures: "model" (the network's score), "constant" (every response ties) or "nan_on_odd_length".
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class CustomOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    hidden_state: torch.FloatTensor = None
    score: torch.FloatTensor = None
    gating_output: torch.FloatTensor = None


class TinyArmoRewardModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(-1)
        # Rightmost real token, whichever side the batch was padded on.
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last = (positions * attention_mask).argmax(-1)
        hidden = hidden_states[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        rewards = self.regression_layer(hidden) * 10.0
        gating_output = torch.softmax(self.gating(hidden), dim=-1)
        score = (rewards * gating_output).sum(-1, keepdim=True)
        mode = getattr(self.config, "score_mode", "model")
        if mode == "constant":
            score = torch.full_like(score, 0.5)
        elif mode == "nan_on_odd_length":
            score = torch.where((lengths % 2 == 1).unsqueeze(-1), torch.full_like(score, float("nan")), score)
        return CustomOutput(rewards=rewards, hidden_state=hidden_states, score=score, gating_output=gating_output)
