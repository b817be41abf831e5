"""RLHFlow/ArmoRM-Llama3-8B-v0.1 without its remote code.

Its `modeling_custom.py` no longer imports on transformers 5 (it imports `LLAMA_INPUTS_DOCSTRING`, gone), and a
reward model that only loads with remote code is one the user must audit. The architecture is small: a Llama
backbone; a regression layer (hidden -> 19 objectives, no bias) read at the sequence's last token; a gating network
(3 hidden layers of 1024 with ReLU, then 19, softmax at temperature 10, times a learned `logit_scale`) read at the
`<|eot_id|>` that closes the last user turn (the start of the last `<|eot_id|><|start_header_id|>assistant
<|end_header_id|>\\n\\n`); the score is the gate-weighted sum of the objectives after the checkpoint's
`reward_transform_matrix` (which takes the verbosity objective's share out of the others). This class loads the
published checkpoint's weights under the same names, so `from_pretrained` needs no remote code.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


ARCHITECTURE = "LlamaForRewardModelWithGating"  # what the published config.json names
# tokenizer.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n") on Llama-3's tokenizer
LLAMA3_GATING_PATTERN = (128009, 128006, 78191, 128007, 271)


@dataclass
class ArmoRMOutput(ModelOutput):
    score: torch.FloatTensor = None  # [batch]: the preference score
    rewards: torch.FloatTensor = None  # [batch, objectives]
    gating_output: torch.FloatTensor = None  # [batch, objectives]


class GatingNetwork(nn.Module):
    def __init__(self, in_features: int, out_features: int, temperature: float, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        sizes = [in_features] + [hidden_dim] * n_hidden
        self.layers = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])] + [nn.Linear(sizes[-1], out_features)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return F.softmax(self.layers[-1](x) / self.temperature, dim=1) * self.logit_scale[0]


def gating_positions(input_ids: torch.Tensor, pattern: tuple[int, ...], last: torch.Tensor) -> torch.Tensor:
    """Per row, where the last occurrence of `pattern` starts. A row cut to `reward_max_length` before its assistant
    header (the reward stage counts it in `reward_inputs_truncated`) has none: it is gated at its last token."""
    width = len(pattern)
    if input_ids.shape[1] < width:
        return last
    windows = input_ids.unfold(1, width, 1)  # [batch, positions, width]
    found = (windows == torch.tensor(pattern, device=input_ids.device)).all(-1)
    positions = torch.arange(found.shape[1], device=input_ids.device)
    starts = torch.where(found, positions, -1).max(-1).values
    return torch.where(starts >= 0, starts, last)


class ArmoRMRewardModel(LlamaPreTrainedModel):
    """ArmoRM's scorer. Returns `ArmoRMOutput` (`.score` is what the reward stage reads)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        objectives = getattr(config, "num_objectives", 19)
        self.regression_layer = nn.Linear(config.hidden_size, objectives, bias=False)
        self.post_init()
        # Created after post_init, as in the original: the checkpoint's values replace them.
        self.reward_transform_matrix = nn.Parameter(torch.eye(objectives), requires_grad=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            objectives,
            getattr(config, "gating_temperature", 10),
            getattr(config, "gating_hidden_dim", 1024),
            getattr(config, "gating_n_hidden", 3),
        )
        self.gating_pattern = tuple(getattr(config, "gating_token_pattern", None) or LLAMA3_GATING_PATTERN)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> ArmoRMOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # The rightmost real token, as the original reads it on right-padded rows.
        last = (torch.arange(input_ids.shape[1], device=input_ids.device) * attention_mask).argmax(-1)
        rewards = self.regression_layer(hidden[rows, last])
        gating_output = self.gating(hidden[rows, gating_positions(input_ids, self.gating_pattern, last)])
        transformed = rewards @ self.reward_transform_matrix.to(rewards.dtype)
        return ArmoRMOutput(score=(gating_output * transformed).sum(-1), rewards=rewards, gating_output=gating_output)
